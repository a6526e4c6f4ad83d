//! API-key leases through the real server: a `wak_` key is handed out once (never by a retry,
//! a renewal or a second delivery), only its hash is kept, introspection accepts it like a JWT
//! while its lease lives and refuses it after the task ends, and a forged or misdirected key is
//! refused.

use warrant::proto;

use crate::support::*;

const SEARCH: &str = "https://search.test";

async fn an_api_key_is_handed_out_once_and_dies_with_its_task(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let server = app
        .connect(Some(&app.resource_server("search-api", &[SEARCH]).await))
        .await;
    let agent = app.agent("search-agent").await;
    let request = proto::BeginTaskRequest {
        idempotency_key: "run-1".into(),
        ..begin(&["search:query", "crm.contacts:read"])
    };
    let task = agent
        .tasks()
        .begin_task(request.clone())
        .await
        .unwrap()
        .into_inner();
    let lease = task
        .leases
        .iter()
        .find(|l| l.scope == "search:query")
        .unwrap();
    assert_eq!(lease.kind(), proto::CredentialKind::ApiKey);
    let key = lease.credential.clone();
    assert!(key.starts_with("wak_"), "a recognisable prefix: {key}");

    let answer = introspect_as(&server, &key, SEARCH).await;
    assert!(answer.active);
    assert_eq!(
        (
            answer.scope.as_str(),
            answer.jti.as_str(),
            answer.task_id.as_str(),
            answer.client_id.as_str()
        ),
        (
            "search:query",
            lease.lease_id.as_str(),
            task.task_id.as_str(),
            "search-agent"
        )
    );
    // Refused: another audience, an altered secret, a made-up key for the same lease.
    assert!(!app.is_active(&key, CRM).await);
    let mut altered = key.clone();
    let last = altered.pop().unwrap();
    altered.push(if last == 'A' { 'B' } else { 'A' });
    assert!(!introspect_as(&server, &altered, SEARCH).await.active);
    let (forged, _) = warrant::issuer::api_key::generate(
        &warrant::domain::LeaseId::parse("lease_id", &lease.lease_id).unwrap(),
    );
    assert!(!introspect_as(&server, &forged, SEARCH).await.active);

    // A retry answers the same lease without its key (it cannot be shown again); the JWT is
    // signed afresh.
    let replay = agent
        .tasks()
        .begin_task(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay.task_id, task.task_id);
    let again = replay
        .leases
        .iter()
        .find(|l| l.scope == "search:query")
        .unwrap();
    assert_eq!(
        (again.lease_id.as_str(), again.credential.as_str()),
        (lease.lease_id.as_str(), "")
    );
    let jwt = replay
        .leases
        .iter()
        .find(|l| l.scope == "crm.contacts:read")
        .unwrap();
    assert!(!jwt.credential.is_empty());

    // A renewal moves the key's expiry and hands out nothing.
    let renewed = agent
        .tasks()
        .renew_lease(renew_request(&lease.lease_id, 600))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(renewed.credential, "");
    let later = introspect_as(&server, &key, SEARCH).await;
    assert!(
        later.active && later.exp > answer.exp,
        "{} > {}",
        later.exp,
        answer.exp
    );

    // The key appears nowhere in the audit trail (its HMAC does).
    let events = app
        .admin()
        .await
        .admin()
        .query_audit(proto::QueryAuditRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let issued = events
        .iter()
        .find(|event| event.r#type == "lease.issued" && event.lease_id == lease.lease_id)
        .expect("the issuance is audited");
    assert!(
        issued.detail_json.contains("credential_hmac"),
        "{}",
        issued.detail_json
    );
    let secret = key.rsplit('_').next().unwrap();
    assert!(
        events
            .iter()
            .all(|event| !event.detail_json.contains(secret))
    );

    agent
        .tasks()
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap();
    assert!(
        !introspect_as(&server, &key, SEARCH).await.active,
        "it dies with its task"
    );
    app.stop().await;
}

backend_tests!(
    an_api_key_is_handed_out_once_and_dies_with_its_task,
    an_api_key_expires_with_its_lease,
);

async fn an_api_key_expires_with_its_lease(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let server = app
        .connect(Some(&app.resource_server("search-api", &[SEARCH]).await))
        .await;
    let task = app.begin_as("search-agent", &["flash:key"]).await;
    let key = &task.leases[0].credential;
    assert!(introspect_as(&server, key, SEARCH).await.active);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(
        !introspect_as(&server, key, SEARCH).await.active,
        "a key past its lease's expiry is refused, reaper or not"
    );
    app.stop().await;
}

/// A key that waited for an operator comes with the first delivery on the agent's stream, and
/// a second watch of the same grant does not show it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_api_key_is_delivered_once() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let agent = app.agent("billing-agent").await;
    let operator = app
        .connect(Some(&app.workload("alice", &[proto::Role::Operator]).await))
        .await;
    let task = agent
        .tasks()
        .begin_task(begin(&[]))
        .await
        .unwrap()
        .into_inner();
    let pending = agent
        .tasks()
        .request_grant(grant_request(&task.task_id, "payments:key", 0))
        .await
        .unwrap()
        .into_inner()
        .pending
        .expect("payments wait for an operator");
    operator
        .approvals()
        .approve(proto::AnswerRequest {
            lease_id: pending.lease_id.clone(),
            reason: "ticket T-1".into(),
            request_digest: String::new(),
        })
        .await
        .unwrap();
    let delivered = |lease_id: String| {
        let agent = agent.clone();
        async move {
            let mut stream = agent
                .tasks()
                .watch_grant(proto::WatchGrantRequest { lease_id })
                .await
                .unwrap()
                .into_inner();
            loop {
                let status = stream.message().await.unwrap().expect("open stream");
                if status.state() == proto::GrantState::Issued {
                    return status.lease.expect("an issued grant has its lease");
                }
            }
        }
    };
    let first = delivered(pending.lease_id.clone()).await;
    assert!(first.credential.starts_with("wak_"));
    let second = delivered(pending.lease_id.clone()).await;
    assert_eq!(second.credential, "", "a key is delivered once");
    let server = app
        .connect(Some(
            &app.resource_server("payments-api", &["https://payments.test"])
                .await,
        ))
        .await;
    assert!(
        introspect_as(&server, &first.credential, "https://payments.test")
            .await
            .active
    );
    let handed_out = audit_events_of_type(&app.admin().await, "lease.key_handed_out").await;
    assert_eq!(handed_out.len(), 1, "the one delivery is audited");
    assert_eq!(handed_out[0].lease_id, pending.lease_id);
    app.stop().await;
}
