//! The audit trail: the events each action leaves, tamper evidence, and "no action without its
//! event".

use std::time::Duration;

use tonic::Code;
use warrant::audit::chain::{SealedEvent, event_hash};
use warrant::proto;

use crate::support::*;

backend_tests!(
    export_resumes_after_a_sequence_number_and_queries_filter_by_time,
    every_state_change_leaves_exactly_its_events,
    refusals_and_admin_changes_are_recorded,
    verify_names_an_altered_event,
    verify_names_a_removed_event,
    verify_names_reordered_events,
    verify_detects_a_truncated_trail,
    verify_detects_a_rewritten_chain_through_the_signed_checkpoint,
    an_external_anchor_catches_a_rewrite_with_deleted_checkpoints_and_a_forged_key,
    an_external_anchor_catches_deleted_checkpoints,
    verify_under_load_never_reports_a_false_truncation,
    a_failing_audit_write_fails_the_action_and_issues_nothing,
);

async fn events(app: &TestApp, request: proto::QueryAuditRequest) -> Vec<proto::AuditEvent> {
    app.admin()
        .await
        .admin()
        .query_audit(request)
        .await
        .unwrap()
        .into_inner()
        .events
}

async fn task_events(app: &TestApp, task_id: &str) -> Vec<proto::AuditEvent> {
    events(
        app,
        proto::QueryAuditRequest {
            task_id: task_id.into(),
            ..Default::default()
        },
    )
    .await
}

async fn verify(app: &TestApp) -> proto::VerifyAuditResponse {
    verify_against(app, None).await
}

async fn verify_against(
    app: &TestApp,
    anchor: Option<proto::AuditAnchor>,
) -> proto::VerifyAuditResponse {
    app.admin()
        .await
        .admin()
        .verify_audit(proto::VerifyAuditRequest { anchor })
        .await
        .unwrap()
        .into_inner()
}

async fn anchor_of(app: &TestApp) -> proto::AuditAnchor {
    app.admin()
        .await
        .admin()
        .get_audit_anchor(proto::GetAuditAnchorRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Waits until every event is sealed and a signed checkpoint covers the whole chain.
async fn sealed_and_checkpointed(app: &TestApp) {
    let settled = eventually(Duration::from_secs(10), || async {
        let report = verify(app).await;
        report.intact
            && report.unsealed == 0
            && report.events_checked > 0
            && report.last_checkpoint_seq == report.events_checked
    })
    .await;
    assert!(
        settled,
        "the trail was not sealed and checkpointed in time: {:?}",
        verify(app).await
    );
}

/// A trail with a few dozen events: a task with two leases, a grant, completion.
async fn busy_trail(backend: Backend) -> (TestData, TestApp) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let task = agent
        .begin_task(begin(&["crm.contacts:read", "tickets:write"]))
        .await
        .unwrap()
        .into_inner();
    agent
        .request_grant(grant_request(&task.task_id, "crm.contacts:read", 0))
        .await
        .unwrap();
    agent
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap();
    sealed_and_checkpointed(&app).await;
    (data, app)
}

fn types(events: &[proto::AuditEvent]) -> Vec<String> {
    let mut types: Vec<String> = events.iter().map(|e| e.r#type.clone()).collect();
    types.sort();
    types
}

async fn every_state_change_leaves_exactly_its_events(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();

    let task = agent
        .begin_task(begin(&["crm.contacts:read", "tickets:write"]))
        .await
        .unwrap()
        .into_inner();
    let after_begin = task_events(&app, &task.task_id).await;
    assert_eq!(
        types(&after_begin),
        [
            "grant.decided",
            "grant.decided",
            "lease.issued",
            "lease.issued",
            "task.begun"
        ]
    );

    let grant = agent
        .request_grant(grant_request(&task.task_id, "crm.contacts:read", 0))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    agent
        .renew_lease(renew_request(&grant.lease_id, 400))
        .await
        .unwrap();
    assert!(app.is_active(&grant.credential, CRM).await);
    agent
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap();
    assert!(!app.is_active(&grant.credential, CRM).await);

    let all = task_events(&app, &task.task_id).await;
    // Three grants, and the renewal, which policy decides too.
    let expected = [
        "grant.decided",
        "grant.decided",
        "grant.decided",
        "grant.decided",
        "lease.issued",
        "lease.issued",
        "lease.issued",
        "lease.renewed",
        "lease.revoked",
        "lease.revoked",
        "lease.revoked",
        "task.begun",
        "task.completed",
        "token.introspected",
        "token.introspected",
    ];
    assert_eq!(types(&all), expected);
    let digest = format!("sha256:{}", "ab".repeat(32));
    for event in &all {
        assert_eq!(event.workload, "crm-agent", "{}", event.r#type);
        assert!(
            event.context_json.contains(&digest),
            "{} carries the task context",
            event.r#type
        );
    }
    let checks: Vec<_> = all
        .iter()
        .filter(|e| e.r#type == "token.introspected")
        .collect();
    assert_eq!(
        (checks[0].outcome.as_str(), checks[0].actor.as_str()),
        ("active", "admin")
    );
    assert_eq!(checks[0].lease_id, grant.lease_id);
    assert_eq!(
        checks[1].outcome, "inactive",
        "a use after completion joins the task's story"
    );
    assert!(
        checks[1].detail_json.contains("lease revoked"),
        "{}",
        checks[1].detail_json
    );
    let issued = all
        .iter()
        .find(|e| e.r#type == "lease.issued" && e.lease_id == grant.lease_id)
        .unwrap();
    let hmac = app
        .admin()
        .await
        .admin()
        .audit_hash(proto::AuditHashRequest {
            value: grant.credential.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .hmac;
    assert!(
        issued.detail_json.contains(&hmac),
        "the issuance holds the token's HMAC, so it can be matched"
    );
    let ordered: Vec<&str> = all.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(ordered.first(), Some(&"grant.decided"));
    assert_eq!(
        ordered[ordered.len() - 2..],
        ["task.completed", "token.introspected"],
        "completion, then the refused use"
    );
}

async fn refusals_and_admin_changes_are_recorded(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();

    let refused = agent
        .begin_task(begin(&["crm.contacts:read", "payments:refund"]))
        .await
        .unwrap_err();
    app.admin()
        .await
        .admin()
        .rotate_signing_key(proto::RotateSigningKeyRequest {})
        .await
        .unwrap();
    let task = agent
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap()
        .into_inner();
    let target = proto::revoke_request::Target::LeaseId(task.leases[0].lease_id.clone());
    app.admin()
        .await
        .admin()
        .revoke(proto::RevokeRequest {
            target: Some(target),
        })
        .await
        .unwrap();

    assert_eq!(refused.code(), Code::PermissionDenied);
    let of_type = |event_type: &str| proto::QueryAuditRequest {
        r#type: event_type.into(),
        ..Default::default()
    };
    let decisions = events(&app, of_type("grant.decided")).await;
    let denied: Vec<_> = decisions.iter().filter(|e| e.outcome == "denied").collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].scope, "payments:refund");
    assert!(
        denied[0].detail_json.contains("scope-catalog"),
        "names the deciding policy: {}",
        denied[0].detail_json
    );
    assert!(
        denied[0].detail_json.contains("may not request"),
        "gives the reason: {}",
        denied[0].detail_json
    );
    let refusals = events(&app, of_type("task.refused")).await;
    assert_eq!(refusals.len(), 1);
    assert_eq!(refusals[0].outcome, "denied");
    assert!(
        refusals[0].context_json.contains("crm.search"),
        "the refused request's context: {}",
        refusals[0].context_json
    );

    let rotations = events(&app, of_type("signing_key.rotated")).await;
    assert_eq!(rotations.len(), 1);
    assert_eq!(rotations[0].actor, "admin");
    let created = events(&app, of_type("workload.created")).await;
    let creators: Vec<&str> = created.iter().map(|e| e.actor.as_str()).collect();
    assert_eq!(creators, ["warrant/bootstrap", "admin"]);
    let requested = events(&app, of_type("revocation.requested")).await;
    assert_eq!(requested.len(), 1);
    assert_eq!(requested[0].lease_id, task.leases[0].lease_id);
    let revoked: Vec<_> = task_events(&app, &task.task_id)
        .await
        .into_iter()
        .filter(|e| e.r#type == "lease.revoked")
        .collect();
    assert_eq!(revoked.len(), 1);
    assert_eq!(
        (revoked[0].actor.as_str(), revoked[0].outcome.as_str()),
        ("admin", "confirmed")
    );
    let by_agent = events(
        &app,
        proto::QueryAuditRequest {
            workload: "crm-agent".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(
        by_agent
            .iter()
            .all(|e| e.workload == "crm-agent" || e.actor == "crm-agent")
    );
    assert!(
        by_agent.iter().any(|e| e.r#type == "lease.revoked"),
        "events caused by an admin but concerning the agent"
    );
}

async fn tamper_and_verify(backend: Backend, tamper: &str) -> proto::VerifyAuditResponse {
    let (data, app) = busy_trail(backend).await;
    execute_sql(&data, tamper).await;
    verify(&app).await
}

/// SQL naming the audit event at chain position `seq`: SQLite keeps the position in the event's
/// row, PostgreSQL in the chain table beside the events.
fn event_at(backend: Backend, seq: i64) -> String {
    match backend {
        Backend::Sqlite => format!("seq = {seq}"),
        Backend::Postgres => format!("id = (SELECT event_id FROM audit_chain WHERE seq = {seq})"),
    }
}

async fn verify_names_an_altered_event(backend: Backend) {
    let report = tamper_and_verify(
        backend,
        &format!(
            r#"UPDATE audit_events SET detail_json = '{{"reason":"nothing to see"}}' WHERE {}"#,
            event_at(backend, 5)
        ),
    )
    .await;
    assert!(!report.intact);
    assert_eq!(report.problem_seq, 5);
    assert!(report.problem.contains("altered"), "{}", report.problem);
    assert!(!report.problem_event_id.is_empty());
}

async fn verify_names_a_removed_event(backend: Backend) {
    let report = tamper_and_verify(
        backend,
        &format!("DELETE FROM audit_events WHERE {}", event_at(backend, 6)),
    )
    .await;
    assert!(!report.intact);
    assert_eq!(report.problem_seq, 6);
    assert!(report.problem.contains("missing"), "{}", report.problem);
}

async fn verify_names_reordered_events(backend: Backend) {
    let table = match backend {
        Backend::Sqlite => "audit_events",
        Backend::Postgres => "audit_chain",
    };
    let swap = format!(
        "UPDATE {table} SET seq = -1 WHERE seq = 4; UPDATE {table} SET seq = 4 WHERE seq = 7; \
         UPDATE {table} SET seq = 7 WHERE seq = -1"
    );
    let report = tamper_and_verify(backend, &swap).await;
    assert!(!report.intact);
    assert_eq!(report.problem_seq, 4);
    assert!(
        report.problem.contains("does not follow"),
        "{}",
        report.problem
    );
}

async fn verify_detects_a_truncated_trail(backend: Backend) {
    let truncate = match backend {
        Backend::Sqlite => "DELETE FROM audit_events WHERE seq > 3",
        Backend::Postgres => {
            "DELETE FROM audit_events WHERE id IN (SELECT event_id FROM audit_chain WHERE seq > 3); \
             DELETE FROM audit_chain WHERE seq > 3"
        }
    };
    let report = tamper_and_verify(backend, truncate).await;
    assert!(!report.intact);
    assert!(report.problem.contains("truncated"), "{}", report.problem);
    assert_eq!(report.events_checked, 3);
}

async fn verify_detects_a_rewritten_chain_through_the_signed_checkpoint(backend: Backend) {
    let (data, app) = busy_trail(backend).await;
    rewrite_chain(backend, &data, &app).await;

    let report = verify(&app).await;

    assert!(!report.intact, "{report:?}");
    assert!(report.problem.contains("checkpoint"), "{}", report.problem);
}

/// An attacker who can write the database rewrites the trail and the proof together: alters an
/// event, recomputes the chain, deletes every checkpoint and signs a new one over the forged
/// head with a key row of their own. The stored state is then consistent, so only an anchor
/// kept elsewhere can tell.
async fn an_external_anchor_catches_a_rewrite_with_deleted_checkpoints_and_a_forged_key(
    backend: Backend,
) {
    let (data, app) = busy_trail(backend).await;
    let anchor = anchor_of(&app).await;
    let (head_seq, head_hash) = rewrite_chain(backend, &data, &app).await;
    let (forged_key, _) =
        warrant::issuer::SigningKey::generate(warrant::issuer::KeyAlgorithm::EdDsa);
    let signature = forged_key.sign(&warrant::audit::chain::checkpoint_message(
        head_seq, &head_hash,
    ));
    let bytes = |value: &[u8]| match backend {
        Backend::Sqlite => format!("X'{}'", warrant::domain::ids::hex(value)),
        Backend::Postgres => format!("'\\x{}'::bytea", warrant::domain::ids::hex(value)),
    };
    execute_sql(
        &data,
        &format!(
            "DELETE FROM audit_checkpoints; \
             INSERT INTO signing_keys (kid, algorithm, public_key, sealed_private_key, created_at, retired_at, publish_until, activated_at) \
               VALUES ('{kid}', 'EdDSA', {public}, {sealed}, 0, 1, 1, 0); \
             INSERT INTO audit_checkpoints (seq, head_hash, kid, signature, created_at) \
               VALUES ({head_seq}, '{head_hash}', '{kid}', {signature}, 0)",
            kid = forged_key.kid(),
            public = bytes(&forged_key.verifying_key().public_key),
            sealed = bytes(&[0]),
            signature = bytes(&signature),
        ),
    )
    .await;

    let unanchored = verify(&app).await;
    assert!(
        unanchored.intact && !unanchored.anchored,
        "without an anchor the forgery passes, as the README says: {unanchored:?}"
    );
    let anchored = verify_against(&app, Some(anchor)).await;
    assert!(!anchored.intact, "{anchored:?}");
    assert!(anchored.anchored);
    assert!(
        anchored.problem.contains("rewritten"),
        "{}",
        anchored.problem
    );
}

async fn an_external_anchor_catches_deleted_checkpoints(backend: Backend) {
    let (data, app) = busy_trail(backend).await;
    let anchor = anchor_of(&app).await;
    let intact = verify_against(&app, Some(anchor.clone())).await;
    assert!(intact.intact && intact.anchored, "{intact:?}");
    // Events sealed after the anchor (a checkpoint may not cover them yet) are the tail.
    let anchored_seq = anchor.checkpoint.as_ref().unwrap().seq;
    assert!(intact.trusted_through_seq >= anchored_seq, "{intact:?}");
    assert_eq!(
        intact.events_after_trusted,
        intact.events_checked - intact.trusted_through_seq
    );

    execute_sql(&data, "DELETE FROM audit_checkpoints").await;
    let report = verify_against(&app, Some(anchor)).await;
    assert!(!report.intact, "{report:?}");
    assert!(report.problem.contains("deleted"), "{}", report.problem);
}

/// `audit verify` reads the head first and walks up to it, so events sealed while it walks
/// never make a busy trail look truncated.
async fn verify_under_load_never_reports_a_false_truncation(backend: Backend) {
    let (_data, app) = busy_trail(backend).await;
    let credential = app.workload("load-agent", &[proto::Role::Agent]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let mut tasks = app.connect(Some(&credential)).await.tasks();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = tasks.begin_task(begin(&["crm.contacts:read"])).await;
            }
        }));
    }
    for _ in 0..20 {
        let report = verify(&app).await;
        assert!(report.intact, "{report:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
}

/// Alters event 2 and recomputes every later hash and the stored head, as an attacker with
/// write access would; returns the forged head (seq, hash).
async fn rewrite_chain(backend: Backend, data: &TestData, app: &TestApp) -> (i64, String) {
    let all = app
        .admin()
        .await
        .admin()
        .export_audit(proto::ExportAuditRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut stream = all;
    let mut sealed = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        sealed.push(event);
    }
    let mut previous = sealed[0].hash.clone();
    let mut statements = Vec::new();
    for event in &sealed[1..] {
        let mut rewritten = SealedEvent {
            seq: event.seq as i64,
            id: event.id.clone(),
            occurred_at: 0,
            event_type: event.r#type.clone(),
            outcome: event.outcome.clone(),
            actor: event.actor.clone(),
            workload: Some(event.workload.clone()).filter(|w| !w.is_empty()),
            task_id: Some(event.task_id.clone()).filter(|t| !t.is_empty()),
            scope: Some(event.scope.clone()).filter(|s| !s.is_empty()),
            lease_id: Some(event.lease_id.clone()).filter(|l| !l.is_empty()),
            detail_json: if event.seq == 2 {
                r#"{"forged":true}"#.into()
            } else {
                event.detail_json.clone()
            },
            context_json: Some(event.context_json.clone()).filter(|c| !c.is_empty()),
            prev_hash: previous.clone(),
            hash: String::new(),
        };
        let occurred = event.occurred_at.unwrap();
        rewritten.occurred_at = occurred.seconds * 1000 + i64::from(occurred.nanos / 1_000_000);
        rewritten.hash = event_hash(&rewritten);
        statements.push(match backend {
            Backend::Sqlite => format!(
                "UPDATE audit_events SET detail_json = '{}', prev_hash = '{}', hash = '{}' WHERE seq = {}",
                rewritten.detail_json, rewritten.prev_hash, rewritten.hash, rewritten.seq
            ),
            Backend::Postgres => format!(
                "UPDATE audit_events SET detail_json = '{}' WHERE {}; \
                 UPDATE audit_chain SET prev_hash = '{}', hash = '{}' WHERE seq = {}",
                rewritten.detail_json,
                event_at(backend, rewritten.seq),
                rewritten.prev_hash,
                rewritten.hash,
                rewritten.seq
            ),
        });
        previous = rewritten.hash;
    }
    statements.push(format!(
        "UPDATE audit_head SET last_hash = '{previous}' WHERE id = 1"
    ));
    execute_sql(data, &statements.join("; ")).await;
    (sealed.last().unwrap().seq as i64, previous)
}

async fn a_failing_audit_write_fails_the_action_and_issues_nothing(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let task = agent.begin_task(begin(&[])).await.unwrap().into_inner();
    let refuse_issuance_events = match backend {
        Backend::Sqlite => "CREATE TRIGGER refuse_issuance_audit BEFORE INSERT ON audit_events \
                            WHEN NEW.event_type = 'lease.issued' BEGIN SELECT RAISE(ABORT, 'audit store refuses'); END"
            .to_owned(),
        Backend::Postgres => "CREATE FUNCTION refuse_audit() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'audit store refuses'; END $$ \
                              LANGUAGE plpgsql; CREATE TRIGGER refuse_issuance_audit BEFORE INSERT ON audit_events FOR EACH ROW \
                              WHEN (NEW.event_type = 'lease.issued') EXECUTE FUNCTION refuse_audit()"
            .to_owned(),
    };
    execute_sql(&data, &refuse_issuance_events).await;
    let leases_before = count_rows(&data, "leases").await;
    let tasks_before = count_rows(&data, "tasks").await;

    let begin_status = agent
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap_err();
    let grant_status = agent
        .request_grant(grant_request(&task.task_id, "crm.contacts:read", 0))
        .await
        .unwrap_err();

    assert_eq!(begin_status.code(), Code::Internal);
    assert_eq!(grant_status.code(), Code::Internal);
    assert!(
        !begin_status.message().contains("audit store refuses"),
        "internals stay in the log"
    );
    assert_eq!(
        count_rows(&data, "leases").await,
        leases_before,
        "no lease without its event"
    );
    assert_eq!(
        count_rows(&data, "tasks").await,
        tasks_before,
        "no task without its events"
    );
}

async fn export_resumes_after_a_sequence_number_and_queries_filter_by_time(backend: Backend) {
    let (_data, app) = busy_trail(backend).await;
    let export = |after_seq: u64| {
        let app = &app;
        async move {
            let mut stream = app
                .admin()
                .await
                .admin()
                .export_audit(proto::ExportAuditRequest { after_seq })
                .await
                .unwrap()
                .into_inner();
            let mut seqs = Vec::new();
            while let Some(event) = stream.message().await.unwrap() {
                seqs.push(event.seq);
            }
            seqs
        }
    };

    let everything = export(0).await;
    let resumed = export(5).await;

    assert_eq!(
        everything,
        (1..=everything.len() as u64).collect::<Vec<_>>(),
        "every sealed event, in chain order"
    );
    assert_eq!(resumed, everything[5..].to_vec());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |seconds: i64| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let future = events(
        &app,
        proto::QueryAuditRequest {
            since: at(now + 3600),
            ..Default::default()
        },
    )
    .await;
    let past = events(
        &app,
        proto::QueryAuditRequest {
            until: at(now - 3600),
            ..Default::default()
        },
    )
    .await;
    let recent = events(
        &app,
        proto::QueryAuditRequest {
            since: at(now - 3600),
            until: at(now + 3600),
            ..Default::default()
        },
    )
    .await;
    assert!(future.is_empty() && past.is_empty());
    assert_eq!(recent.len(), everything.len());
}

/// Two replicas seal the same PostgreSQL trail at once while both take traffic: each event is
/// sealed exactly once, in one intact chain (a sealer that lost the race writes nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn replicas_sealing_one_trail_chain_each_event_once() {
    let (data, first, second) = postgres_replicas().await;
    let credential = first.workload("crm-agent", &[proto::Role::Agent]).await;

    let mut calls = Vec::new();
    for replica in [&first, &second] {
        for _ in 0..40 {
            let mut tasks = replica.connect(Some(&credential)).await.tasks();
            calls.push(tokio::spawn(async move {
                tasks
                    .begin_task(begin(&["crm.contacts:read"]))
                    .await
                    .unwrap()
            }));
        }
    }
    for call in calls {
        call.await.unwrap();
    }
    sealed_and_checkpointed(&first).await;

    let report = verify(&second).await;
    assert!(report.intact, "{report:?}");
    assert_eq!(
        report.events_checked,
        count_rows(&data, "audit_events").await as u64,
        "every stored event is sealed, once"
    );
}

/// SQLite chains each event in the transaction that writes it, so an answered issuance is
/// already tamper-evident; events a store holds unsealed (written before chaining on write) are
/// sealed before the broker serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_chains_events_as_it_writes_them() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    app.begin_as("crm-agent", &["crm.contacts:read"]).await;
    let report = verify(&app).await;
    assert!(report.intact, "{report:?}");
    assert_eq!(report.unsealed, 0, "sealed when answered: {report:?}");
    let chained = report.events_checked;
    assert_eq!(chained, count_rows(&data, "audit_events").await as u64);
    let admin_token = app.admin_token.clone();
    app.stop().await;

    execute_sql(
        &data,
        "INSERT INTO audit_events (id, occurred_at, event_type, outcome, actor, detail_json) \
         VALUES ('evt_unsealed_before_upgrade', 1, 'workload.created', 'ok', 'admin', '{}')",
    )
    .await;
    let mut app = TestApp::spawn(&data).await;
    app.admin_token = admin_token;
    let report = verify(&app).await;
    assert!(report.intact, "{report:?}");
    assert_eq!(report.unsealed, 0, "sealed before serving: {report:?}");
    assert_eq!(report.events_checked, chained + 1);
    app.begin_as("other-agent", &["crm.contacts:read"]).await;
    let report = verify(&app).await;
    assert!(report.intact && report.unsealed == 0, "{report:?}");
}
