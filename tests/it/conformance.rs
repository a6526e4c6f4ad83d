//! The store conformance suite: the `Store` contract, written once and run on SQLite and on
//! PostgreSQL, through the public trait only. Every operation, the races that must never leave
//! a credential behind (a lease added or renewed while its task completes or the reaper runs),
//! idempotent retries, the feed's ordering guarantee, the job queue, and back-pressure. Tests
//! that need two replicas on one database run on PostgreSQL only (SQLite serves one broker).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use warrant::audit::AuditEvent;
use warrant::audit::chain::ChainWalk;
use warrant::domain::task::LeaseWindow;
use warrant::domain::{
    CredentialKind, LeaseId, LeaseState, RevocationReason, Role, ScopeName, SpiffeId, TaskContext,
    TaskId, TaskState, UnixMillis, WorkloadName,
};
use warrant::error::Error;
use warrant::issuer::credential::StoredCredential;
use warrant::issuer::{KeyAlgorithm, SigningKey};
use warrant::store::{
    AuditFilter, Checkpoint, CompletionOutcome, IdentityEnd, JobOutcome, JoinTokenRecord,
    LeaseRecord, NewJob, NewLeaseOutcome, Renewal, RenewalOutcome, SharedStore, StoreSettings,
    StoredCaKey, StoredJwtSvidKey, StoredSigningKey, SvidRecord, TaskInsertion, TaskRecord, Topic,
    WorkloadRecord,
};

use crate::support::*;

backend_tests!(
    a_task_and_its_leases_read_back_as_stored,
    one_idempotency_key_stores_one_task,
    a_lease_is_added_only_to_an_active_task_of_its_owner,
    renewal_moves_an_issued_unexpired_lease_only,
    completion_revokes_every_issued_lease_and_reports_it,
    a_lease_added_while_its_task_completes_is_never_left_issued,
    a_renewal_racing_the_completion_is_covered_by_the_revocation,
    a_renewal_racing_the_reaper_never_yields_an_expired_credential,
    admin_revocation_of_a_lease_or_a_task,
    the_reaper_expires_leases_and_tasks_whose_time_has_passed,
    the_feed_resumes_after_any_cursor_without_skipping_or_repeating,
    pruning_keeps_exactly_the_revocations_still_in_force,
    endings_reach_introspection_before_the_write_returns_and_survive_a_restart,
    every_audit_event_is_chained_once,
    audit_queries_filter_and_checkpoints_keep_the_first_copy,
    signing_keys_publish_rotate_and_refuse_a_stale_rotation,
    workloads_and_credentials,
    jobs_are_claimed_once_retried_with_backoff_and_finished_by_their_claim,
    a_job_whose_runner_died_is_taken_again_after_its_claim_lapses,
    a_stalled_database_refuses_writes_instead_of_queueing_them,
    a_failing_write_fails_alone_and_the_writes_beside_it_commit,
    a_join_token_is_used_once_and_revocation_ends_svids_and_tokens,
    concurrent_uses_of_one_join_token_on_one_store_consume_it_once,
    the_first_ca_and_jwt_svid_keys_stored_win,
    a_revoked_identity_opens_no_task,
);

/// A fresh store with two workloads, `agent-a` and `agent-b`.
struct Fixture {
    data: TestData,
    store: SharedStore,
    agent_a: String,
    agent_b: String,
}

impl Fixture {
    async fn new(backend: Backend) -> Fixture {
        Self::with_settings(backend, StoreSettings::default()).await
    }

    async fn with_settings(backend: Backend, settings: StoreSettings) -> Fixture {
        let data = TestData::new(backend).await;
        let store = warrant::store::open(&data.database_url, settings)
            .await
            .expect("store opens");
        let agent_a = create_workload(&store, "agent-a").await;
        let agent_b = create_workload(&store, "agent-b").await;
        Fixture {
            data,
            store,
            agent_a,
            agent_b,
        }
    }

    /// Another store on the same database, as a second replica (PostgreSQL) would open it.
    async fn replica(&self) -> SharedStore {
        warrant::store::open(&self.data.database_url, StoreSettings::default())
            .await
            .expect("replica opens")
    }

    /// Opens a task of `workload_id` with one lease valid for `lease_ttl`.
    async fn task_with_lease(
        &self,
        workload_id: &str,
        lease_ttl: Duration,
    ) -> (TaskRecord, LeaseRecord) {
        let task = task(workload_id, Duration::from_secs(3600), None);
        let lease = lease(&task, lease_ttl);
        assert_eq!(
            self.store
                .insert_task(
                    task.clone(),
                    vec![lease.clone()],
                    vec![event("task.begun", &task)]
                )
                .await
                .unwrap(),
            TaskInsertion::Inserted
        );
        (task, lease)
    }
}

async fn create_workload(store: &SharedStore, name: &str) -> String {
    let workload = WorkloadRecord {
        id: format!("wl_{name}"),
        name: WorkloadName::parse("name", name).unwrap(),
        spiffe_id: SpiffeId::from_stored(format!("spiffe://test/workload/{name}")),
        roles: vec![Role::Agent],
        audiences: Vec::new(),
        selectors: Vec::new(),
        created_at: UnixMillis::now(),
        revoked_at: None,
        labels: Default::default(),
        deleted_at: None,
    };
    let credential = StoredCredential {
        id: format!("cred_{name}"),
        secret_sha256: vec![7; 32],
    };
    store
        .create_workload(workload.clone(), Some(credential), vec![])
        .await
        .unwrap();
    workload.id
}

fn task(workload_id: &str, ttl: Duration, idempotency_key: Option<&str>) -> TaskRecord {
    let now = UnixMillis::now();
    TaskRecord {
        id: TaskId::generate(now),
        workload_id: workload_id.to_owned(),
        purpose: "conformance".into(),
        context: TaskContext::default(),
        state: TaskState::Active,
        created_at: now,
        deadline: now.plus(ttl),
        ended_at: None,
        idempotency_key: idempotency_key.map(str::to_owned),
        request_digest: idempotency_key.map(|_| "digest".to_owned()),
    }
}

fn lease(task: &TaskRecord, ttl: Duration) -> LeaseRecord {
    let now = UnixMillis::now();
    LeaseRecord {
        id: LeaseId::generate(now),
        task_id: task.id.clone(),
        scope: ScopeName::parse("scope", "crm.contacts:read").unwrap(),
        kind: CredentialKind::Jwt,
        audience: CRM.into(),
        state: LeaseState::Issued,
        kid: Some("kid-1".into()),
        window: LeaseWindow {
            issued_at: now,
            expires_at: now.plus(ttl),
            renewable_until: now.plus(ttl * 10),
        },
        ended_at: None,
        secret_sha256: None,
    }
}

fn event(event_type: &'static str, task: &TaskRecord) -> AuditEvent {
    AuditEvent::new(event_type, "ok", "conformance").task(&task.id)
}

fn renewal(lease: &LeaseRecord, ttl: Duration, now: UnixMillis) -> Renewal {
    Renewal {
        lease_id: lease.id.clone(),
        task_id: lease.task_id.clone(),
        window: LeaseWindow {
            issued_at: now,
            expires_at: now.plus(ttl),
            ..lease.window
        },
        kid: "kid-2".into(),
        now,
    }
}

async fn lease_state(store: &SharedStore, task: &TaskId, lease: &LeaseId) -> LeaseRecord {
    store
        .leases_of_task(task)
        .await
        .unwrap()
        .into_iter()
        .find(|stored| stored.id == *lease)
        .expect("lease stored")
}

/// Every feed event after `cursor`, page by page.
async fn feed_after(store: &SharedStore, mut cursor: u64) -> Vec<warrant::store::FeedRecord> {
    let mut records = Vec::new();
    loop {
        let page = store.feed_after(cursor, 7).await.unwrap();
        let is_last = page.records.len() < 7;
        cursor = page.cursor;
        records.extend(page.records);
        if is_last && !page.is_held_back {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn a_task_and_its_leases_read_back_as_stored(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let task = task(&fixture.agent_a, Duration::from_secs(600), Some("key-1"));
    let leases = vec![
        lease(&task, Duration::from_secs(60)),
        lease(&task, Duration::from_secs(90)),
    ];
    let inserted = fixture
        .store
        .insert_task(
            task.clone(),
            leases.clone(),
            vec![event("task.begun", &task)],
        )
        .await
        .unwrap();

    assert_eq!(inserted, TaskInsertion::Inserted);
    let stored = fixture
        .store
        .find_task(&task.id, &fixture.agent_a)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.id.clone(), stored.deadline, stored.state),
        (task.id.clone(), task.deadline, TaskState::Active)
    );
    let by_key = fixture
        .store
        .find_task_by_idempotency_key(&fixture.agent_a, "key-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_key.id, task.id);
    assert!(
        fixture
            .store
            .find_task(&task.id, &fixture.agent_b)
            .await
            .unwrap()
            .is_none(),
        "another workload's task"
    );
    let stored_leases = fixture.store.leases_of_task(&task.id).await.unwrap();
    assert_eq!(stored_leases.len(), 2);
    for lease in &leases {
        let stored = stored_leases
            .iter()
            .find(|stored| stored.id == lease.id)
            .unwrap();
        assert_eq!(
            (stored.window, stored.state),
            (lease.window, LeaseState::Issued)
        );
    }
    let found = fixture
        .store
        .find_lease(&leases[0].id, &fixture.agent_a)
        .await
        .unwrap();
    assert_eq!(found.map(|lease| lease.window), Some(leases[0].window));
    assert!(
        fixture
            .store
            .find_lease(&leases[0].id, &fixture.agent_b)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        fixture
            .store
            .is_lease_live(&leases[0].id, &task.id, UnixMillis::now())
            .await
            .unwrap()
    );
}

async fn one_idempotency_key_stores_one_task(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let stores: Vec<SharedStore> = match backend {
        Backend::Sqlite => vec![fixture.store.clone(); 8],
        // Retries reaching two replicas at once.
        Backend::Postgres => {
            let replica = fixture.replica().await;
            (0..8)
                .map(|i| {
                    if i % 2 == 0 {
                        fixture.store.clone()
                    } else {
                        replica.clone()
                    }
                })
                .collect()
        }
    };
    let attempts: Vec<(TaskRecord, LeaseRecord)> = (0..8)
        .map(|_| {
            let task = task(&fixture.agent_a, Duration::from_secs(600), Some("retried"));
            let lease = lease(&task, Duration::from_secs(60));
            (task, lease)
        })
        .collect();
    let calls = stores.iter().zip(&attempts).map(|(store, (task, lease))| {
        store.insert_task(
            task.clone(),
            vec![lease.clone()],
            vec![event("task.begun", task)],
        )
    });
    let outcomes: Vec<bool> = join_all(calls)
        .await
        .into_iter()
        .map(|outcome| match outcome.unwrap() {
            TaskInsertion::Inserted => true,
            TaskInsertion::KeyTaken => false,
            TaskInsertion::IdentityRevoked => panic!("the workload is live"),
        })
        .collect();

    assert_eq!(
        outcomes.iter().filter(|inserted| **inserted).count(),
        1,
        "{outcomes:?}"
    );
    let winner = &attempts[outcomes.iter().position(|inserted| *inserted).unwrap()].0;
    for store in &stores[..2] {
        let found = store
            .find_task_by_idempotency_key(&fixture.agent_a, "retried")
            .await
            .unwrap();
        assert_eq!(found.map(|task| task.id), Some(winner.id.clone()));
    }
    for (task, _) in attempts.iter().filter(|(task, _)| task.id != winner.id) {
        assert!(
            fixture
                .store
                .leases_of_task(&task.id)
                .await
                .unwrap()
                .is_empty(),
            "a loser stored nothing"
        );
    }
    assert_eq!(count_rows(&fixture.data, "tasks").await, 1);
}

async fn a_lease_is_added_only_to_an_active_task_of_its_owner(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let now = UnixMillis::now();
    let (open, _) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;

    let added = fixture
        .store
        .add_lease(
            &fixture.agent_a,
            lease(&open, Duration::from_secs(60)),
            now,
            vec![],
        )
        .await;
    let foreign = fixture
        .store
        .add_lease(
            &fixture.agent_b,
            lease(&open, Duration::from_secs(60)),
            now,
            vec![],
        )
        .await;
    let after_deadline = fixture
        .store
        .add_lease(
            &fixture.agent_a,
            lease(&open, Duration::from_secs(60)),
            open.deadline.plus(Duration::from_secs(1)),
            vec![],
        )
        .await;
    fixture
        .store
        .complete_task(&open.id, &fixture.agent_a, now, "agent-a")
        .await
        .unwrap();
    let after_completion = fixture
        .store
        .add_lease(
            &fixture.agent_a,
            lease(&open, Duration::from_secs(60)),
            now,
            vec![],
        )
        .await;

    assert_eq!(added.unwrap(), NewLeaseOutcome::Added);
    assert_eq!(foreign.unwrap(), NewLeaseOutcome::TaskNotActive);
    assert_eq!(after_deadline.unwrap(), NewLeaseOutcome::TaskNotActive);
    assert_eq!(after_completion.unwrap(), NewLeaseOutcome::TaskNotActive);
    assert_eq!(
        fixture.store.leases_of_task(&open.id).await.unwrap().len(),
        2
    );
}

async fn renewal_moves_an_issued_unexpired_lease_only(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let (task, lease) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;
    let now = UnixMillis::now();

    let renewed = fixture
        .store
        .renew_lease(renewal(&lease, Duration::from_secs(120), now), vec![])
        .await
        .unwrap();
    let stored = lease_state(&fixture.store, &task.id, &lease.id).await;
    let too_late = fixture
        .store
        .renew_lease(
            renewal(&lease, Duration::from_secs(120), stored.window.expires_at),
            vec![],
        )
        .await
        .unwrap();
    fixture
        .store
        .revoke_lease(&lease.id, now, "admin", vec![])
        .await
        .unwrap();
    let after_revocation = fixture
        .store
        .renew_lease(renewal(&lease, Duration::from_secs(120), now), vec![])
        .await
        .unwrap();

    assert_eq!(renewed, RenewalOutcome::Renewed);
    assert_eq!(stored.window.expires_at, now.plus(Duration::from_secs(120)));
    assert_eq!(stored.kid.as_deref(), Some("kid-2"));
    assert_eq!(
        too_late,
        RenewalOutcome::NotRenewable,
        "an expired lease is not renewed"
    );
    assert_eq!(after_revocation, RenewalOutcome::NotRenewable);
}

async fn completion_revokes_every_issued_lease_and_reports_it(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let cursor = fixture.store.feed_head().await.unwrap();
    let (task, first) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;
    let now = UnixMillis::now();
    let second = lease(&task, Duration::from_secs(300));
    fixture
        .store
        .add_lease(&fixture.agent_a, second.clone(), now, vec![])
        .await
        .unwrap();

    let foreign = fixture
        .store
        .complete_task(&task.id, &fixture.agent_b, now, "agent-b")
        .await
        .unwrap();
    let completed = fixture
        .store
        .complete_task(&task.id, &fixture.agent_a, now, "agent-a")
        .await
        .unwrap();
    let again = fixture
        .store
        .complete_task(&task.id, &fixture.agent_a, now, "agent-a")
        .await
        .unwrap();

    assert!(
        matches!(foreign, CompletionOutcome::NotFound),
        "another workload's task"
    );
    let CompletionOutcome::Completed { revoked, .. } = completed else {
        panic!("the task was active: {completed:?}");
    };
    let revoked: HashSet<_> = revoked.into_iter().map(|ended| ended.id).collect();
    assert_eq!(
        revoked,
        HashSet::from([first.id.clone(), second.id.clone()])
    );
    assert!(
        matches!(again, CompletionOutcome::AlreadyEnded(ref task) if task.state == TaskState::Completed)
    );
    for stored in fixture.store.leases_of_task(&task.id).await.unwrap() {
        assert_eq!(stored.state, LeaseState::Revoked);
    }
    let events = feed_after(&fixture.store, cursor).await;
    assert_eq!(events.len(), 3, "two leases, then the task: {events:?}");
    assert!(
        events[..2]
            .iter()
            .all(|record| record.event.lease_id.is_some()
                && record.event.reason == RevocationReason::TaskCompleted)
    );
    let task_event = &events[2].event;
    assert_eq!(
        (task_event.lease_id.as_ref(), task_event.task_id.as_str()),
        (None, task.id.as_str())
    );
    assert_eq!(
        task_event.not_after, second.window.expires_at,
        "as long as the longest lease"
    );
    let audit = fixture
        .store
        .query_audit(AuditFilter {
            task_id: Some(task.id.to_string()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let types: Vec<&str> = audit
        .iter()
        .map(|record| record.event.event_type.as_str())
        .collect();
    assert!(
        types.contains(&"task.completed")
            && types.iter().filter(|t| **t == "lease.revoked").count() == 2,
        "{types:?}"
    );
}

async fn a_lease_added_while_its_task_completes_is_never_left_issued(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let other = match backend {
        Backend::Sqlite => fixture.store.clone(),
        Backend::Postgres => fixture.replica().await,
    };
    for _ in 0..20 {
        let (task, _) = fixture
            .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
            .await;
        let now = UnixMillis::now();
        let additions = (0..6).map(|i| {
            let store = if i % 2 == 0 { &fixture.store } else { &other };
            store.add_lease(
                &fixture.agent_a,
                lease(&task, Duration::from_secs(60)),
                now,
                vec![],
            )
        });
        let (added, completed) = tokio::join!(
            join_all(additions),
            other.complete_task(&task.id, &fixture.agent_a, now, "agent-a"),
        );
        let CompletionOutcome::Completed { revoked, .. } = completed.unwrap() else {
            panic!("the task was active");
        };
        let added = added
            .into_iter()
            .map(Result::unwrap)
            .filter(|outcome| *outcome == NewLeaseOutcome::Added)
            .count();
        let leases = fixture.store.leases_of_task(&task.id).await.unwrap();
        assert_eq!(leases.len(), 1 + added, "a refused lease is not stored");
        assert!(
            leases
                .iter()
                .all(|lease| lease.state == LeaseState::Revoked),
            "no lease outlives the completion"
        );
        assert_eq!(
            revoked.len(),
            leases.len(),
            "the completion reports every lease it swept"
        );
    }
}

async fn a_renewal_racing_the_completion_is_covered_by_the_revocation(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let other = match backend {
        Backend::Sqlite => fixture.store.clone(),
        Backend::Postgres => fixture.replica().await,
    };
    let cursor = fixture.store.feed_head().await.unwrap();
    let mut renewed_windows = Vec::new();
    for _ in 0..20 {
        let (task, lease) = fixture
            .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
            .await;
        let now = UnixMillis::now();
        let (renewed, completed) = tokio::join!(
            fixture
                .store
                .renew_lease(renewal(&lease, Duration::from_secs(600), now), vec![]),
            other.complete_task(&task.id, &fixture.agent_a, now, "agent-a"),
        );
        assert!(matches!(
            completed.unwrap(),
            CompletionOutcome::Completed { .. }
        ));
        assert_eq!(
            lease_state(&fixture.store, &task.id, &lease.id).await.state,
            LeaseState::Revoked
        );
        if renewed.unwrap() == RenewalOutcome::Renewed {
            renewed_windows.push((lease.id.to_string(), now.plus(Duration::from_secs(600))));
        }
    }
    let events = feed_after(&fixture.store, cursor).await;
    for (lease, expires_at) in renewed_windows {
        let ended = events
            .iter()
            .find(|record| record.event.lease_id.as_deref() == Some(&lease))
            .unwrap();
        assert!(
            ended.event.not_after >= expires_at,
            "the revocation covers the renewed token"
        );
    }
}

async fn a_renewal_racing_the_reaper_never_yields_an_expired_credential(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let reaper = match backend {
        Backend::Sqlite => fixture.store.clone(),
        Backend::Postgres => fixture.replica().await,
    };
    for _ in 0..20 {
        let (task, lease) = fixture
            .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
            .await;
        // The renewal is decided just before the lease's expiry, the sweep just after it.
        let expiry = lease.window.expires_at;
        let (renewed, _) = tokio::join!(
            fixture.store.renew_lease(
                renewal(&lease, Duration::from_secs(300), UnixMillis(expiry.0 - 1)),
                vec![]
            ),
            reaper.expire_due(UnixMillis(expiry.0 + 1), 1000),
        );
        let stored = lease_state(&fixture.store, &task.id, &lease.id).await;
        match renewed.unwrap() {
            RenewalOutcome::Renewed => {
                assert_eq!(
                    stored.state,
                    LeaseState::Issued,
                    "a renewed lease is not expired under it"
                );
                assert!(stored.window.expires_at > UnixMillis(expiry.0 + 1));
            }
            RenewalOutcome::NotRenewable => assert_eq!(stored.state, LeaseState::Expired),
        }
    }
}

async fn admin_revocation_of_a_lease_or_a_task(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let (task, lease) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;
    let (other_task, other_lease) = fixture
        .task_with_lease(&fixture.agent_b, Duration::from_secs(60))
        .await;
    let now = UnixMillis::now();

    let revoked_lease = fixture
        .store
        .revoke_lease(
            &lease.id,
            now,
            "admin",
            vec![event("revocation.requested", &task)],
        )
        .await
        .unwrap();
    let twice = fixture
        .store
        .revoke_lease(&lease.id, now, "admin", vec![])
        .await
        .unwrap();
    let revoked_task = fixture
        .store
        .revoke_task(&other_task.id, now, "admin", vec![])
        .await
        .unwrap();
    let task_twice = fixture
        .store
        .revoke_task(&other_task.id, now, "admin", vec![])
        .await
        .unwrap();

    assert_eq!(revoked_lease.map(|ended| ended.id), Some(lease.id.clone()));
    assert!(twice.is_none());
    assert_eq!(
        revoked_task
            .unwrap()
            .into_iter()
            .map(|ended| ended.id)
            .collect::<Vec<_>>(),
        vec![other_lease.id.clone()]
    );
    assert!(task_twice.is_none());
    assert_eq!(
        fixture
            .store
            .find_task(&task.id, &fixture.agent_a)
            .await
            .unwrap()
            .unwrap()
            .state,
        TaskState::Active,
        "only the lease"
    );
    assert_eq!(
        fixture
            .store
            .find_task(&other_task.id, &fixture.agent_b)
            .await
            .unwrap()
            .unwrap()
            .state,
        TaskState::Revoked
    );
    assert!(
        !fixture
            .store
            .is_lease_live(&lease.id, &task.id, now)
            .await
            .unwrap()
    );
    assert!(
        !fixture
            .store
            .is_lease_live(&other_lease.id, &other_task.id, now)
            .await
            .unwrap()
    );
}

async fn the_reaper_expires_leases_and_tasks_whose_time_has_passed(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let cursor = fixture.store.feed_head().await.unwrap();
    let (lasting, long_lease) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(3600))
        .await;
    let (_, short_lease) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(1))
        .await;
    let ending = task(&fixture.agent_a, Duration::from_secs(2), None);
    let ending_lease = lease(&ending, Duration::from_secs(2));
    fixture
        .store
        .insert_task(ending.clone(), vec![ending_lease.clone()], vec![])
        .await
        .unwrap();
    let later = UnixMillis::now().plus(Duration::from_secs(10));

    let report = fixture.store.expire_due(later, 1).await.unwrap();
    let rest = fixture.store.expire_due(later, 1000).await.unwrap();
    let nothing = fixture.store.expire_due(later, 1000).await.unwrap();

    assert_eq!(report.tasks, 1, "{report:?}");
    assert!(
        report.leases.len() <= 2,
        "a batch of 1 ends one lease by its expiry, and the expired task's: {report:?}"
    );
    assert_eq!(report.leases.len() + rest.leases.len(), 2);
    assert_eq!((nothing.leases.len(), nothing.tasks), (0, 0));
    assert_eq!(
        lease_state(&fixture.store, &lasting.id, &long_lease.id)
            .await
            .state,
        LeaseState::Issued
    );
    assert_eq!(
        fixture
            .store
            .find_task(&ending.id, &fixture.agent_a)
            .await
            .unwrap()
            .unwrap()
            .state,
        TaskState::Expired
    );
    let events = feed_after(&fixture.store, cursor).await;
    let reason_of = |lease: &LeaseRecord| {
        events
            .iter()
            .find(|record| record.event.lease_id.as_deref() == Some(lease.id.as_str()))
            .map(|record| record.event.reason)
    };
    assert_eq!(
        reason_of(&short_lease),
        Some(RevocationReason::LeaseExpired)
    );
    assert!(reason_of(&ending_lease).is_some());
    assert!(events.iter().any(|record| record.event.lease_id.is_none()
        && record.event.task_id == ending.id.as_str()
        && record.event.reason == RevocationReason::TaskExpired));
}

/// Pruning drops the events whose tokens have all expired and nothing else, so reading from 0,
/// or from a cursor that was pruned away, yields exactly the revocations still in force.
async fn pruning_keeps_exactly_the_revocations_still_in_force(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let (short, _) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;
    let (long, long_lease) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(7200))
        .await;
    for task in [&short, &long] {
        fixture
            .store
            .complete_task(&task.id, &fixture.agent_a, UnixMillis::now(), "agent-a")
            .await
            .unwrap();
    }
    let before = feed_after(&fixture.store, 0).await;
    assert_eq!(before.len(), 4, "a lease and a task event per completion");

    // An hour from now the short task's tokens have expired, the long one's have not.
    let horizon = UnixMillis::now().plus(Duration::from_secs(3600));
    assert_eq!(
        fixture.store.prune_feed(horizon, 1).await.unwrap(),
        1,
        "bounded by the limit"
    );
    assert_eq!(fixture.store.prune_feed(horizon, 100).await.unwrap(), 1);
    assert_eq!(fixture.store.prune_feed(horizon, 100).await.unwrap(), 0);

    for cursor in [0, before[0].cursor, before[1].cursor] {
        let kept = feed_after(&fixture.store, cursor).await;
        assert_eq!(kept.len(), 2, "from {cursor}: {kept:?}");
        assert!(
            kept.iter()
                .all(|record| record.event.task_id == long.id.as_str())
        );
        assert!(
            kept.iter()
                .any(|record| record.event.lease_id.as_deref() == Some(long_lease.id.as_str()))
        );
    }
    assert_eq!(fixture.store.feed_head().await.unwrap(), before[3].cursor);

    // The newest event stays even once expired, so the head never moves back.
    let far = UnixMillis::now().plus(Duration::from_secs(86_400));
    fixture.store.prune_feed(far, 100).await.unwrap();
    assert_eq!(fixture.store.feed_head().await.unwrap(), before[3].cursor);
}

async fn the_feed_resumes_after_any_cursor_without_skipping_or_repeating(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let other = match backend {
        Backend::Sqlite => fixture.store.clone(),
        Backend::Postgres => fixture.replica().await,
    };
    let start = fixture.store.feed_head().await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        tasks.push(
            fixture
                .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
                .await
                .0,
        );
    }
    let completions = tasks.iter().enumerate().map(|(index, task)| {
        let store = if index % 2 == 0 {
            &fixture.store
        } else {
            &other
        };
        store.complete_task(&task.id, &fixture.agent_a, UnixMillis::now(), "agent-a")
    });
    join_all(completions).await.into_iter().for_each(|outcome| {
        outcome.unwrap();
    });

    let all = feed_after(&fixture.store, start).await;
    assert_eq!(all.len(), 24, "a lease and a task event per completion");
    assert!(
        all.windows(2).all(|pair| pair[0].cursor < pair[1].cursor),
        "cursors only grow"
    );
    let ended: HashSet<&str> = all
        .iter()
        .filter(|r| r.event.lease_id.is_none())
        .map(|r| r.event.task_id.as_str())
        .collect();
    assert_eq!(ended.len(), 12);
    for (index, record) in all.iter().enumerate() {
        let resumed = feed_after(&fixture.store, record.cursor).await;
        assert_eq!(
            resumed,
            all[index + 1..].to_vec(),
            "resuming after event {index}"
        );
    }
    assert_eq!(
        fixture.store.feed_head().await.unwrap(),
        all.last().unwrap().cursor
    );
}

async fn endings_reach_introspection_before_the_write_returns_and_survive_a_restart(
    backend: Backend,
) {
    let fixture = Fixture::new(backend).await;
    let (task, lease) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;
    let (revoked_task, revoked_lease) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;
    let (live_task, live_lease) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;
    let now = UnixMillis::now();

    fixture
        .store
        .complete_task(&task.id, &fixture.agent_a, now, "agent-a")
        .await
        .unwrap();
    assert!(
        !fixture
            .store
            .is_lease_live(&lease.id, &task.id, now)
            .await
            .unwrap(),
        "exact at once"
    );
    fixture
        .store
        .revoke_lease(&revoked_lease.id, now, "admin", vec![])
        .await
        .unwrap();
    assert!(
        !fixture
            .store
            .is_lease_live(&revoked_lease.id, &revoked_task.id, now)
            .await
            .unwrap()
    );
    assert!(
        fixture
            .store
            .is_lease_live(&live_lease.id, &live_task.id, now)
            .await
            .unwrap()
    );

    fixture.store.close().await;
    let reopened = warrant::store::open(&fixture.data.database_url, StoreSettings::default())
        .await
        .unwrap();
    let is_live = |lease: &LeaseRecord| {
        let store = reopened.clone();
        let (lease, task) = (lease.id.clone(), lease.task_id.clone());
        async move {
            // A replica reads the database until its follower has caught up.
            store
                .is_lease_live(&lease, &task, UnixMillis::now())
                .await
                .unwrap()
        }
    };
    assert!(
        !is_live(&lease).await,
        "a completed task's lease after a restart"
    );
    assert!(!is_live(&revoked_lease).await);
    assert!(is_live(&live_lease).await);
    assert!(
        eventually(Duration::from_secs(2), || async {
            reopened.revocations().len() == (2, 1)
        })
        .await,
        "the unexpired endings are loaded (two ended leases, one completed task): {:?}",
        reopened.revocations().len()
    );
}

async fn every_audit_event_is_chained_once(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let other = match backend {
        Backend::Sqlite => fixture.store.clone(),
        Backend::Postgres => fixture.replica().await,
    };
    let writes = (0..40).map(|index| {
        let store = if index % 2 == 0 {
            &fixture.store
        } else {
            &other
        };
        store.record_events(
            (0..3)
                .map(|_| AuditEvent::new("test.recorded", "ok", "conformance"))
                .collect(),
        )
    });
    join_all(writes)
        .await
        .into_iter()
        .for_each(|outcome| outcome.unwrap());
    // Two sealers (one per replica on PostgreSQL) race until nothing is left.
    loop {
        let (first, second) = tokio::join!(
            fixture.store.seal_audit_events(50),
            other.seal_audit_events(50)
        );
        if first.unwrap() + second.unwrap() == 0
            && fixture.store.unsealed_audit_events().await.unwrap() == 0
        {
            break;
        }
    }

    let stored = count_rows(&fixture.data, "audit_events").await;
    let mut walk = ChainWalk::new([]);
    let mut after = 0;
    loop {
        let page = fixture.store.sealed_audit_events(after, 33).await.unwrap();
        for record in &page {
            walk.check(&record.event).expect("an intact chain");
            after = record.event.seq;
        }
        if page.len() < 33 {
            break;
        }
    }
    assert_eq!(walk.last_seq(), stored, "every event chained exactly once");
    assert_eq!(fixture.store.audit_head().await.unwrap().0, stored);
}

async fn audit_queries_filter_and_checkpoints_keep_the_first_copy(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let (task, _) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;
    fixture
        .store
        .record_events(vec![
            AuditEvent::new("token.introspected", "active", "crm-api").task(&task.id),
            AuditEvent::new("grant.decided", "denied", "agent-b").workload("agent-b"),
        ])
        .await
        .unwrap();
    while fixture.store.seal_audit_events(500).await.unwrap() > 0
        || fixture.store.unsealed_audit_events().await.unwrap() > 0
    {}
    let query = |filter: AuditFilter| {
        fixture.store.query_audit(AuditFilter {
            limit: 100,
            ..filter
        })
    };

    let of_task = query(AuditFilter {
        task_id: Some(task.id.to_string()),
        ..Default::default()
    })
    .await
    .unwrap();
    let of_agent_a = query(AuditFilter {
        workload: Some("agent-a".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let denied = query(AuditFilter {
        event_type: Some("grant.decided".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let future = query(AuditFilter {
        since: Some(UnixMillis::now().plus(Duration::from_secs(60))),
        ..Default::default()
    })
    .await
    .unwrap();

    assert_eq!(of_task.len(), 2, "the task's events: {of_task:?}");
    assert!(
        of_task.iter().all(|record| record.seq.is_some()),
        "sealed events carry their position"
    );
    let use_check = of_task
        .iter()
        .find(|record| record.event.event_type == "token.introspected")
        .unwrap();
    assert_eq!(
        use_check.event.workload.as_deref(),
        Some("agent-a"),
        "a use check joins its task's owner"
    );
    assert!(use_check.event.context_json.is_some(), "and its context");
    assert_eq!(of_agent_a.len(), 2);
    assert_eq!(denied.len(), 1);
    assert!(future.is_empty());

    let (seq, hash) = fixture.store.audit_head().await.unwrap();
    let checkpoint = |signature: u8| Checkpoint {
        seq,
        head_hash: hash.clone(),
        kid: "kid".into(),
        signature: vec![signature],
    };
    fixture
        .store
        .insert_checkpoint(checkpoint(1), UnixMillis::now())
        .await
        .unwrap();
    fixture
        .store
        .insert_checkpoint(checkpoint(2), UnixMillis::now())
        .await
        .unwrap();
    let stored = fixture.store.checkpoints().await.unwrap();
    assert_eq!((stored.len(), stored[0].signature.clone()), (1, vec![1]));
}

/// A key created at `created_at`: current when `activated` (it signs), else a next key.
fn stored_key(created_at: UnixMillis, activated: bool) -> (SigningKey, StoredSigningKey) {
    let (key, _) = SigningKey::generate(KeyAlgorithm::EdDsa);
    let record = StoredSigningKey {
        kid: key.kid().to_owned(),
        algorithm: KeyAlgorithm::EdDsa,
        public_key: key.verifying_key().public_key.clone(),
        sealed_private_key: vec![1, 2, 3],
        created_at,
        activated_at: activated.then_some(created_at),
        retired_at: None,
        publish_until: None,
    };
    (key, record)
}

async fn signing_keys_publish_rotate_and_refuse_a_stale_rotation(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let key_changes = fixture.store.changes().subscribe(Topic::Keys);
    let now = UnixMillis::now();
    let (_, first) = stored_key(now, true);
    let (_, second) = stored_key(now.plus(Duration::from_millis(1)), false);
    let (_, third) = stored_key(now.plus(Duration::from_millis(2)), false);
    let (_, fourth) = stored_key(now.plus(Duration::from_millis(3)), false);
    for key in [&first, &second] {
        fixture
            .store
            .insert_signing_key(key.clone(), vec![])
            .await
            .unwrap();
    }
    assert!(key_changes.has_changed().unwrap(), "a new key is announced");

    // The next key (second) becomes current, the current (first) retires, third is next.
    fixture
        .store
        .rotate_signing_key(
            third.clone(),
            &second.kid,
            &first.kid,
            now.plus(Duration::from_secs(60)),
            vec![],
        )
        .await
        .unwrap();
    for (promoted, retired) in [(&second, &first), (&third, &first), (&second, &second)] {
        let stale = fixture
            .store
            .rotate_signing_key(fourth.clone(), &promoted.kid, &retired.kid, now, vec![])
            .await;
        assert!(
            matches!(stale, Err(Error::FailedPrecondition(_))),
            "{stale:?}"
        );
    }
    let published = fixture.store.published_signing_keys(now).await.unwrap();
    let kids: Vec<&str> = published.iter().map(|key| key.kid.as_str()).collect();
    assert_eq!(
        kids,
        vec![third.kid.as_str(), second.kid.as_str(), first.kid.as_str()],
        "newest first, nothing of the refused rotations"
    );
    let states: Vec<(bool, bool)> = published
        .iter()
        .map(|key| (key.is_current(), key.is_next()))
        .collect();
    assert_eq!(states, vec![(false, true), (true, false), (false, false)]);
    let later = fixture
        .store
        .published_signing_keys(now.plus(Duration::from_secs(61)))
        .await
        .unwrap();
    assert_eq!(later.len(), 2, "a retired key leaves after its window");
    let public = fixture.store.signing_public_key(&first.kid).await.unwrap();
    assert_eq!(
        public,
        Some((KeyAlgorithm::EdDsa, first.public_key.clone()))
    );
    assert_eq!(
        fixture
            .store
            .latest_expiry_signed_by("kid-1")
            .await
            .unwrap(),
        None
    );
    let (_, lease) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;
    assert_eq!(
        fixture
            .store
            .latest_expiry_signed_by("kid-1")
            .await
            .unwrap(),
        Some(lease.window.expires_at)
    );
}

async fn workloads_and_credentials(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let mut changes = fixture.store.changes().subscribe(Topic::Workloads);
    changes.mark_unchanged();

    let id = create_workload(&fixture.store, "agent-c").await;
    let duplicate = fixture
        .store
        .create_workload(
            WorkloadRecord {
                id: "wl_other".into(),
                name: WorkloadName::parse("name", "agent-c").unwrap(),
                spiffe_id: SpiffeId::from_stored("spiffe://test/workload/other".into()),
                roles: vec![Role::Admin],
                audiences: Vec::new(),
                selectors: Vec::new(),
                created_at: UnixMillis::now(),
                revoked_at: None,
                labels: Default::default(),
                deleted_at: None,
            },
            Some(StoredCredential {
                id: "cred_other".into(),
                secret_sha256: vec![1],
            }),
            vec![],
        )
        .await;

    assert!(
        changes.has_changed().unwrap(),
        "a new workload is announced"
    );
    assert!(
        matches!(duplicate, Err(Error::AlreadyExists(_))),
        "{duplicate:?}"
    );
    assert!(fixture.store.has_workloads().await.unwrap());
    let (secret, workload) = fixture
        .store
        .find_credential("cred_agent-c")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (secret, workload.id, workload.roles),
        (vec![7; 32], id, vec![Role::Agent])
    );
    assert!(
        fixture
            .store
            .find_credential("cred_unknown")
            .await
            .unwrap()
            .is_none()
    );
    let names: Vec<String> = fixture
        .store
        .list_workloads()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.name.to_string())
        .collect();
    assert_eq!(names, vec!["agent-a", "agent-b", "agent-c"]);
    assert_eq!(
        count_rows(&fixture.data, "workload_credentials").await,
        3,
        "nothing of the refused duplicate"
    );

    // A rotation leaves the new credential the only valid one; a revocation leaves none.
    let name = WorkloadName::parse("name", "agent-c").unwrap();
    changes.mark_unchanged();
    let rotated = StoredCredential {
        id: "cred_agent-c-2".into(),
        secret_sha256: vec![8; 32],
    };
    let found = fixture
        .store
        .replace_workload_credentials(&name, Some(rotated), UnixMillis::now(), vec![])
        .await
        .unwrap()
        .expect("agent-c exists");
    assert_eq!(found.name, name);
    assert!(changes.has_changed().unwrap(), "a rotation is announced");
    let valid = |id: &'static str| {
        let store = fixture.store.clone();
        async move { store.find_credential(id).await.unwrap().is_some() }
    };
    assert!(
        !valid("cred_agent-c").await,
        "the old credential is revoked"
    );
    assert!(valid("cred_agent-c-2").await);
    fixture
        .store
        .replace_workload_credentials(&name, None, UnixMillis::now(), vec![])
        .await
        .unwrap()
        .unwrap();
    assert!(!valid("cred_agent-c-2").await);
    assert!(valid("cred_agent-a").await, "other workloads keep theirs");
    let unknown = WorkloadName::parse("name", "agent-z").unwrap();
    assert!(
        fixture
            .store
            .replace_workload_credentials(&unknown, None, UnixMillis::now(), vec![])
            .await
            .unwrap()
            .is_none()
    );
}

async fn jobs_are_claimed_once_retried_with_backoff_and_finished_by_their_claim(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let now = UnixMillis::now();
    let kinds = vec!["test.echo".to_owned()];
    let (task, _) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;
    let jobs = vec![
        NewJob::new("test.echo", serde_json::json!({"n": 1}), now),
        NewJob::new(
            "test.echo",
            serde_json::json!({"n": 2}),
            now.plus(Duration::from_secs(60)),
        ),
        NewJob::new("test.other", serde_json::json!({}), now),
    ];
    fixture
        .store
        .enqueue_jobs(jobs, vec![event("job.queued", &task)])
        .await
        .unwrap();
    let queued_with = fixture
        .store
        .query_audit(AuditFilter {
            event_type: Some("job.queued".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();

    let claimed = fixture
        .store
        .claim_jobs(&kinds, 10, Duration::from_secs(30), now)
        .await
        .unwrap();
    let again = fixture
        .store
        .claim_jobs(&kinds, 10, Duration::from_secs(30), now)
        .await
        .unwrap();

    assert_eq!(
        queued_with.len(),
        1,
        "a job is stored with the change that causes it"
    );
    assert_eq!(
        claimed.len(),
        1,
        "only due jobs of the runner's kinds: {claimed:?}"
    );
    assert_eq!(
        (claimed[0].payload.clone(), claimed[0].attempts),
        (serde_json::json!({"n": 1}), 1)
    );
    assert!(again.is_empty(), "a claimed job is not claimed twice");
    let retry_at = now.plus(Duration::from_secs(5));
    let failed = JobOutcome::Failed {
        retry_at,
        error: "backend unreachable".into(),
    };
    assert!(fixture.store.finish_job(&claimed[0], failed).await.unwrap());
    assert!(
        fixture
            .store
            .claim_jobs(&kinds, 10, Duration::from_secs(30), now)
            .await
            .unwrap()
            .is_empty(),
        "not before its retry"
    );
    let pending = fixture.store.pending_jobs(10).await.unwrap();
    let retried = pending.iter().find(|job| job.id == claimed[0].id).unwrap();
    assert_eq!(
        (retried.last_error.as_deref(), retried.run_after),
        (Some("backend unreachable"), retry_at)
    );

    let second = fixture
        .store
        .claim_jobs(&kinds, 10, Duration::from_secs(30), retry_at)
        .await
        .unwrap();
    assert_eq!((second.len(), second[0].attempts), (1, 2));
    assert!(
        !fixture
            .store
            .finish_job(&claimed[0], JobOutcome::Done)
            .await
            .unwrap(),
        "an old claim finishes nothing"
    );
    assert!(
        fixture
            .store
            .finish_job(&second[0], JobOutcome::Done)
            .await
            .unwrap()
    );
    assert_eq!(
        fixture.store.pending_jobs(10).await.unwrap().len(),
        2,
        "done jobs leave the queue"
    );
}

async fn a_job_whose_runner_died_is_taken_again_after_its_claim_lapses(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let now = UnixMillis::now();
    let kinds = vec!["test.echo".to_owned()];
    fixture
        .store
        .enqueue_jobs(
            vec![NewJob::new("test.echo", serde_json::json!({}), now)],
            vec![],
        )
        .await
        .unwrap();
    let claimed = fixture
        .store
        .claim_jobs(&kinds, 1, Duration::from_secs(30), now)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    // The runner's process dies mid-job: the store closes without the job being finished.
    fixture.store.close().await;
    let restarted = warrant::store::open(&fixture.data.database_url, StoreSettings::default())
        .await
        .unwrap();

    let too_soon = restarted
        .claim_jobs(
            &kinds,
            1,
            Duration::from_secs(30),
            now.plus(Duration::from_secs(29)),
        )
        .await
        .unwrap();
    let lapsed = restarted
        .claim_jobs(
            &kinds,
            1,
            Duration::from_secs(30),
            now.plus(Duration::from_secs(31)),
        )
        .await
        .unwrap();

    assert!(
        too_soon.is_empty(),
        "not while the dead runner's claim holds"
    );
    assert_eq!((lapsed.len(), lapsed[0].attempts), (1, 2));
    assert!(
        !restarted
            .extend_job_claim(&claimed[0], now.plus(Duration::from_secs(90)))
            .await
            .unwrap(),
        "the dead claim is gone"
    );
    assert!(
        restarted
            .extend_job_claim(&lapsed[0], now.plus(Duration::from_secs(90)))
            .await
            .unwrap()
    );
}

async fn a_stalled_database_refuses_writes_instead_of_queueing_them(backend: Backend) {
    let settings = StoreSettings {
        write_queue: 4,
        write_timeout: Duration::from_secs(2),
    };
    let fixture = Fixture::with_settings(backend, settings).await;
    let stall = stall_writes(&fixture.data).await;
    let store = fixture.store.clone();

    let started = std::time::Instant::now();
    let writes = (0..24)
        .map(|_| store.record_events(vec![AuditEvent::new("test.recorded", "ok", "conformance")]));
    let outcomes = join_all(writes).await;
    let elapsed = started.elapsed();
    drop(stall);

    let refused = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Err(Error::ResourceExhausted(_))))
        .count();
    let timed_out = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Err(Error::Unavailable(_))))
        .count();
    // How many the stalled writer took into its batch before the stall depends on thread
    // timing (on a loaded machine, more); with an unbounded queue none would be refused.
    assert!(refused > 0, "a full queue refuses at once: {outcomes:?}");
    assert_eq!(
        refused + timed_out,
        24,
        "nothing commits while the database is stalled: {outcomes:?}"
    );
    assert!(
        elapsed < Duration::from_secs(8),
        "callers are answered, not left waiting: {elapsed:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            store
                .record_events(vec![AuditEvent::new("test.recorded", "ok", "conformance")])
                .await
                .is_ok()
        })
        .await,
        "writes succeed again once the database answers"
    );
}

async fn a_failing_write_fails_alone_and_the_writes_beside_it_commit(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let (_, existing) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;
    // A task whose lease reuses a stored lease's id: its task row inserts, then its lease
    // violates the primary key, so the write fails half-way and must leave nothing behind.
    let broken = task(&fixture.agent_a, Duration::from_secs(600), None);
    let clashing = LeaseRecord {
        task_id: broken.id.clone(),
        ..existing.clone()
    };
    let tasks: Vec<(TaskRecord, LeaseRecord)> = (0..8)
        .map(|_| {
            let task = task(&fixture.agent_a, Duration::from_secs(600), None);
            let lease = lease(&task, Duration::from_secs(60));
            (task, lease)
        })
        .collect();
    let events_before = count_rows(&fixture.data, "audit_events").await;

    let (failed, inserted) = tokio::join!(
        fixture.store.insert_task(
            broken.clone(),
            vec![clashing],
            vec![event("task.begun", &broken)]
        ),
        join_all(tasks.iter().map(|(task, lease)| {
            fixture.store.insert_task(
                task.clone(),
                vec![lease.clone()],
                vec![event("task.begun", task)],
            )
        })),
    );

    assert!(failed.is_err(), "a clashing lease id is refused");
    assert!(
        fixture
            .store
            .find_task(&broken.id, &fixture.agent_a)
            .await
            .unwrap()
            .is_none(),
        "the failed write's task row was rolled back with it"
    );
    for ((task, _), outcome) in tasks.iter().zip(inserted) {
        assert_eq!(
            outcome.unwrap(),
            TaskInsertion::Inserted,
            "the other writes commit"
        );
        assert_eq!(
            fixture.store.leases_of_task(&task.id).await.unwrap().len(),
            1
        );
    }
    assert_eq!(
        count_rows(&fixture.data, "audit_events").await,
        events_before + 8,
        "only the committed writes' events"
    );
}

/// Holds a lock that stops the store's writes until dropped: SQLite's write lock from another
/// connection, or a PostgreSQL table lock.
async fn stall_writes(data: &TestData) -> Box<dyn std::any::Any + Send> {
    if data.database_url.starts_with("sqlite:") {
        let (locked, stalled) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let path = data.path().join("warrant.db");
        std::thread::spawn(move || {
            let connection = rusqlite::Connection::open(path).unwrap();
            connection.execute_batch("BEGIN EXCLUSIVE").unwrap();
            locked.send(()).unwrap();
            let _ = released.recv();
            connection.execute_batch("ROLLBACK").unwrap();
        });
        stalled.recv().unwrap();
        return Box::new(release);
    }
    use sqlx::Connection as _;
    let mut connection = sqlx::PgConnection::connect(&data.database_url)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut connection)
        .await
        .unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = released.await;
        let _ = sqlx::query("ROLLBACK").execute(&mut connection).await;
    });
    Box::new(release)
}

// --- two replicas on one database: PostgreSQL only ---

/// A revocation committed by one replica reaches the other's feed subscribers and its
/// introspection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn postgres_replicas_learn_each_others_revocations() {
    let fixture = Fixture::new(Backend::Postgres).await;
    let replica = fixture.replica().await;
    let mut feed_changes = replica.changes().subscribe(Topic::Feed);
    let (task, lease) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            replica.revocations().is_current()
        })
        .await,
        "the replica's follower catches up"
    );
    feed_changes.mark_unchanged();

    fixture
        .store
        .complete_task(&task.id, &fixture.agent_a, UnixMillis::now(), "agent-a")
        .await
        .unwrap();

    tokio::time::timeout(Duration::from_secs(1), feed_changes.changed())
        .await
        .expect("woken by the other replica")
        .unwrap();
    assert!(
        eventually(Duration::from_secs(1), || async {
            !replica
                .is_lease_live(&lease.id, &task.id, UnixMillis::now())
                .await
                .unwrap()
        })
        .await,
        "the other replica's introspection learns it"
    );
}

/// Two replicas claiming from one queue never claim the same job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn postgres_replicas_competing_for_jobs_claim_each_once() {
    let fixture = Fixture::new(Backend::Postgres).await;
    let replica = fixture.replica().await;
    let now = UnixMillis::now();
    let jobs: Vec<NewJob> = (0..200)
        .map(|n| NewJob::new("test.echo", serde_json::json!({ "n": n }), now))
        .collect();
    fixture.store.enqueue_jobs(jobs, vec![]).await.unwrap();
    let kinds = Arc::new(vec!["test.echo".to_owned()]);
    let runner = |store: SharedStore| {
        let kinds = kinds.clone();
        tokio::spawn(async move {
            let mut claimed = Vec::new();
            loop {
                let batch = store
                    .claim_jobs(&kinds, 7, Duration::from_secs(60), now)
                    .await
                    .unwrap();
                if batch.is_empty() {
                    return claimed;
                }
                claimed.extend(batch.into_iter().map(|job| job.id));
                // As a runner busy with its jobs would, leaving the other replica its turn.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let (first, second) = tokio::join!(runner(fixture.store.clone()), runner(replica.clone()));

    let (first, second) = (first.unwrap(), second.unwrap());
    let all: HashSet<&String> = first.iter().chain(&second).collect();
    assert_eq!(first.len() + second.len(), 200, "every job claimed");
    assert_eq!(all.len(), 200, "none claimed twice");
    assert!(
        !first.is_empty() && !second.is_empty(),
        "both replicas took part"
    );
}

/// A transaction that commits late never lets a reader skip its event: later events wait
/// behind it (held back) until it has finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn postgres_feed_holds_later_events_back_behind_a_transaction_still_running() {
    use sqlx::Connection as _;
    let fixture = Fixture::new(Backend::Postgres).await;
    let start = fixture.store.feed_head().await.unwrap();
    let mut late = sqlx::PgConnection::connect(&fixture.data.database_url)
        .await
        .unwrap();
    let late_task = TaskId::generate(UnixMillis::now());
    sqlx::raw_sql(&format!(
        "BEGIN; INSERT INTO revocation_feed (ordinal, task_id, reason, not_after, occurred_at) \
         VALUES (0, '{late_task}', 'revoked', 0, 0)"
    ))
    .execute(&mut late)
    .await
    .unwrap();
    let (task, _) = fixture
        .task_with_lease(&fixture.agent_a, Duration::from_secs(60))
        .await;
    fixture
        .store
        .complete_task(&task.id, &fixture.agent_a, UnixMillis::now(), "agent-a")
        .await
        .unwrap();

    let while_running = fixture.store.feed_after(start, 100).await.unwrap();
    sqlx::raw_sql("COMMIT").execute(&mut late).await.unwrap();
    let after_commit = feed_after(&fixture.store, start).await;

    assert!(
        while_running.records.is_empty(),
        "nothing past the running transaction: {while_running:?}"
    );
    assert!(while_running.is_held_back);
    assert_eq!(after_commit.len(), 3);
    assert_eq!(
        after_commit[0].event.task_id,
        late_task.as_str(),
        "the late event first, not skipped"
    );
}

fn join_token(id: &str, workload_id: &str, expires_at: UnixMillis) -> JoinTokenRecord {
    JoinTokenRecord {
        id: id.into(),
        workload_id: workload_id.into(),
        secret_sha256: vec![7; 32],
        created_at: UnixMillis::now(),
        expires_at,
        consumed_at: None,
    }
}

fn svid(thumbprint: &str, workload_id: &str) -> SvidRecord {
    let now = UnixMillis::now();
    SvidRecord {
        thumbprint: thumbprint.into(),
        workload_id: workload_id.into(),
        serial: "01".into(),
        issued_at: now,
        expires_at: UnixMillis(now.0 + 3_600_000),
    }
}

/// Uses of one token that arrive together (on PostgreSQL, likely in one commit batch): one
/// wins, and only its SVID is stored.
async fn concurrent_uses_of_one_join_token_on_one_store_consume_it_once(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let now = UnixMillis::now();
    fixture
        .store
        .insert_join_token(
            join_token("jt-raced", &fixture.agent_a, UnixMillis(now.0 + 60_000)),
            vec![],
        )
        .await
        .unwrap();
    let uses = (0..8).map(|n| {
        let (store, agent) = (fixture.store.clone(), fixture.agent_a.clone());
        async move {
            let svid = svid(&format!("x5t-raced-{n}"), &agent);
            store
                .consume_join_token("jt-raced", now, svid, vec![])
                .await
                .unwrap()
        }
    });
    let consumed = join_all(uses).await;
    assert_eq!(
        consumed.iter().filter(|won| **won).count(),
        1,
        "exactly one use wins: {consumed:?}"
    );
    let stored = (0..8).map(|n| format!("x5t-raced-{n}")).collect::<Vec<_>>();
    let mut found = 0;
    for thumbprint in &stored {
        found += usize::from(fixture.store.find_svid(thumbprint).await.unwrap().is_some());
    }
    assert_eq!(found, 1, "only the winner's SVID is stored");
}

async fn a_join_token_is_used_once_and_revocation_ends_svids_and_tokens(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let store = &fixture.store;
    let now = UnixMillis::now();
    let later = UnixMillis(now.0 + 60_000);
    store
        .insert_join_token(join_token("jt-1", &fixture.agent_a, later), vec![])
        .await
        .unwrap();
    store
        .insert_join_token(join_token("jt-expired", &fixture.agent_a, now), vec![])
        .await
        .unwrap();
    let (found, workload) = store.find_join_token("jt-1").await.unwrap().unwrap();
    assert_eq!(workload.id, fixture.agent_a);
    assert_eq!(
        (found.secret_sha256, found.consumed_at),
        (vec![7; 32], None)
    );

    // Ten uses at once: exactly one consumes it, and only its SVID is stored.
    let uses = (0..10).map(|n| {
        let store = store.clone();
        let agent = fixture.agent_a.clone();
        async move {
            store
                .consume_join_token("jt-1", now, svid(&format!("x5t-{n}"), &agent), vec![])
                .await
                .unwrap()
        }
    });
    let consumed = join_all(uses).await;
    assert_eq!(consumed.iter().filter(|used| **used).count(), 1);
    assert_eq!(count_rows(&fixture.data, "svids").await, 1);
    let (used, _) = store.find_join_token("jt-1").await.unwrap().unwrap();
    assert_eq!(used.consumed_at, Some(now));
    assert!(
        !store
            .consume_join_token(
                "jt-expired",
                now,
                svid("x5t-late", &fixture.agent_a),
                vec![]
            )
            .await
            .unwrap(),
        "an expired token is not consumed"
    );
    assert!(store.find_join_token("no-such").await.unwrap().is_none());

    let winner = (0..10)
        .map(|n| format!("x5t-{n}"))
        .find(|thumbprint| consumed[thumbprint[4..].parse::<usize>().unwrap()])
        .unwrap();
    let (stored, owner) = store.find_svid(&winner).await.unwrap().unwrap();
    assert_eq!(
        (stored.workload_id, owner.id),
        (fixture.agent_a.clone(), fixture.agent_a.clone())
    );
    store
        .insert_svid(svid("x5t-renewed", &fixture.agent_a), vec![])
        .await
        .unwrap();
    store
        .insert_join_token(join_token("jt-unused", &fixture.agent_a, later), vec![])
        .await
        .unwrap();

    // Revoking the workload's credentials ends its SVIDs and unused join tokens too.
    let name = WorkloadName::parse("name", "agent-a").unwrap();
    store
        .replace_workload_credentials(&name, None, UnixMillis::now(), vec![])
        .await
        .unwrap()
        .unwrap();
    assert!(store.find_svid(&winner).await.unwrap().is_none());
    assert!(store.find_svid("x5t-renewed").await.unwrap().is_none());
    assert!(store.find_join_token("jt-unused").await.unwrap().is_none());
    assert!(
        !store
            .consume_join_token(
                "jt-unused",
                UnixMillis::now(),
                svid("x5t-x", &fixture.agent_a),
                vec![]
            )
            .await
            .unwrap()
    );
}

async fn the_first_ca_and_jwt_svid_keys_stored_win(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let key = |sealed: u8| StoredCaKey {
        id: "ca-1".into(),
        certificate: vec![sealed; 8],
        sealed_private_key: vec![sealed; 16],
        created_at: UnixMillis::now(),
        expires_at: UnixMillis(UnixMillis::now().0 + 1_000),
        activated_at: UnixMillis::now(),
        publish_until: None,
    };
    let first = fixture.store.insert_ca_key(key(1)).await.unwrap();
    let second = fixture.store.insert_ca_key(key(2)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(second.len(), 1);
    assert_eq!(
        second[0].sealed_private_key,
        vec![1; 16],
        "the first one stays"
    );

    // A rotation retires the CA once: a second rotation of the same CA lost the race.
    let now = UnixMillis::now();
    let rotated = |id: &str| StoredCaKey {
        id: id.into(),
        activated_at: now,
        ..key(3)
    };
    fixture
        .store
        .rotate_ca(rotated("ca-2"), "ca-1", UnixMillis(now.0 + 60_000), vec![])
        .await
        .unwrap();
    let error = fixture
        .store
        .rotate_ca(rotated("ca-3"), "ca-1", UnixMillis(now.0 + 60_000), vec![])
        .await
        .unwrap_err();
    assert!(
        matches!(error, warrant::error::Error::FailedPrecondition(_)),
        "{error}"
    );
    let published = fixture.store.published_ca_keys(now).await.unwrap();
    let ids: Vec<_> = published.iter().map(|key| key.id.as_str()).collect();
    assert_eq!(
        ids,
        ["ca-1", "ca-2"],
        "nothing of the lost rotation is stored"
    );
    assert_eq!(published[0].publish_until, Some(UnixMillis(now.0 + 60_000)));
    let later = fixture
        .store
        .published_ca_keys(UnixMillis(now.0 + 60_001))
        .await
        .unwrap();
    assert_eq!(
        later.len(),
        1,
        "the retired CA leaves the bundle at publish_until"
    );

    let jwt_key = |sealed: u8| StoredJwtSvidKey {
        id: "jwt-svid-1".into(),
        sealed_private_key: vec![sealed; 16],
        created_at: UnixMillis::now(),
    };
    let first = fixture.store.insert_jwt_svid_key(jwt_key(1)).await.unwrap();
    let second = fixture.store.insert_jwt_svid_key(jwt_key(2)).await.unwrap();
    assert_eq!(first.sealed_private_key, vec![1; 16]);
    assert_eq!(
        second.sealed_private_key,
        vec![1; 16],
        "every replica signs JWT-SVIDs with the first key stored"
    );
}

/// Two replicas racing to use one join token: exactly one SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn postgres_replicas_racing_for_one_join_token_consume_it_once() {
    let fixture = Fixture::new(Backend::Postgres).await;
    let replica = fixture.replica().await;
    let now = UnixMillis::now();
    for n in 0..20 {
        fixture
            .store
            .insert_join_token(
                join_token(
                    &format!("jt-{n}"),
                    &fixture.agent_a,
                    UnixMillis(now.0 + 60_000),
                ),
                vec![],
            )
            .await
            .unwrap();
    }
    let agent = fixture.agent_a.clone();
    let uses = (0..20).flat_map(|n| {
        let agent = agent.clone();
        [fixture.store.clone(), replica.clone()]
            .into_iter()
            .enumerate()
            .map(move |(side, store)| {
                let agent = agent.clone();
                async move {
                    store
                        .consume_join_token(
                            &format!("jt-{n}"),
                            now,
                            svid(&format!("x5t-{n}-{side}"), &agent),
                            vec![],
                        )
                        .await
                        .unwrap()
                }
            })
    });
    let consumed = join_all(uses).await;
    assert_eq!(consumed.iter().filter(|used| **used).count(), 20);
    assert_eq!(count_rows(&fixture.data, "svids").await, 20);
}

/// Once the kill switch has committed, the workload opens no task: nothing of it is stored.
async fn a_revoked_identity_opens_no_task(backend: Backend) {
    let fixture = Fixture::new(backend).await;
    let name = WorkloadName::parse("name", "agent-a").unwrap();
    fixture
        .store
        .revoke_identity(&name, IdentityEnd::Revoked, UnixMillis::now(), vec![])
        .await
        .unwrap()
        .expect("agent-a exists");
    let events_before = count_rows(&fixture.data, "audit_events").await;
    let task = task(&fixture.agent_a, Duration::from_secs(600), None);

    let outcome = fixture
        .store
        .insert_task(
            task.clone(),
            vec![lease(&task, Duration::from_secs(60))],
            vec![event("task.begun", &task)],
        )
        .await
        .unwrap();

    assert_eq!(outcome, TaskInsertion::IdentityRevoked);
    assert!(
        fixture
            .store
            .find_task(&task.id, &fixture.agent_a)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        fixture
            .store
            .leases_of_task(&task.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        count_rows(&fixture.data, "audit_events").await,
        events_before
    );
}

/// A task whose commit races the kill switch on another replica waits for the revocation's
/// row lock and is then refused, so it cannot slip in after the kill switch has listed the
/// open tasks it revokes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn postgres_a_task_racing_the_kill_switch_waits_for_it_and_is_refused() {
    use sqlx::Connection as _;
    let fixture = Fixture::new(Backend::Postgres).await;
    let mut kill_switch = sqlx::PgConnection::connect(&fixture.data.database_url)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "BEGIN; SELECT 1 FROM workloads WHERE id = '{id}' FOR UPDATE; \
         UPDATE workloads SET revoked_at = 1 WHERE id = '{id}'",
        id = fixture.agent_a
    ))
    .execute(&mut kill_switch)
    .await
    .unwrap();
    let task = task(&fixture.agent_a, Duration::from_secs(600), None);
    let store = fixture.store.clone();
    let racing = tokio::spawn({
        let task = task.clone();
        async move {
            store
                .insert_task(
                    task.clone(),
                    vec![lease(&task, Duration::from_secs(60))],
                    vec![],
                )
                .await
        }
    });

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !racing.is_finished(),
        "the insert waits for the kill switch"
    );
    sqlx::raw_sql("COMMIT")
        .execute(&mut kill_switch)
        .await
        .unwrap();
    let outcome = racing.await.unwrap().unwrap();

    assert_eq!(outcome, TaskInsertion::IdentityRevoked);
    assert!(
        fixture
            .store
            .find_task(&task.id, &fixture.agent_a)
            .await
            .unwrap()
            .is_none()
    );
}
