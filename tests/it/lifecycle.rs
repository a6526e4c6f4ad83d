//! Expiry and restarts.

use std::time::Duration;

use warrant::proto;

use crate::support::*;

backend_tests!(
    reaper_reports_expired_leases_on_the_feed,
    restart_reports_leases_and_tasks_that_expired_while_down_and_keeps_keys_and_credentials,
);

async fn collect_events(app: &TestApp, cursor: u64, wanted: usize) -> Vec<proto::RevocationEvent> {
    let mut stream = app
        .admin()
        .await
        .tokens()
        .watch_revocations(proto::WatchRevocationsRequest { cursor })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while events.len() < wanted {
        let batch = tokio::time::timeout(Duration::from_secs(6), stream.message())
            .await
            .expect("events in time")
            .unwrap()
            .unwrap();
        events.extend(batch.events);
    }
    events
}

async fn reaper_reports_expired_leases_on_the_feed(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let task = app.begin_as("crm-agent", &["flash:read"]).await;

    let events = collect_events(&app, 0, 1).await;

    assert_eq!(events[0].lease_id, task.leases[0].lease_id);
    assert_eq!(events[0].reason(), proto::RevocationReason::LeaseExpired);
    assert_eq!(
        events[0].not_after.unwrap().seconds,
        task.leases[0].expires_at.unwrap().seconds
    );
}

async fn restart_reports_leases_and_tasks_that_expired_while_down_and_keeps_keys_and_credentials(
    backend: Backend,
) {
    let data = TestData::new(backend).await;
    let mut config = data.config();
    config.issuer = Some("https://warrant.test".into());
    config.reaper_interval = Duration::from_secs(3600); // only the start-up sweep runs
    let app = TestApp::spawn_with(config.clone()).await;
    let admin_token = app.admin_token.clone();
    let agent_credential = app.workload("crm-agent", &[proto::Role::Agent]).await;
    let mut agent = app.connect(Some(&agent_credential)).await.tasks();
    let lasting = agent
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap()
        .into_inner();
    let mut short = begin(&["flash:read"]);
    short.ttl_seconds = 2;
    let short = agent.begin_task(short).await.unwrap().into_inner();
    app.stop().await;

    tokio::time::sleep(Duration::from_millis(3100)).await;
    let mut restarted = TestApp::spawn_with(config).await;

    assert!(
        restarted.admin_token.is_empty(),
        "a restart creates no second admin credential"
    );
    restarted.admin_token = admin_token; // the first one still works: every call below uses it
    let events = collect_events(&restarted, 0, 2).await;
    let lease_event = events
        .iter()
        .find(|e| e.lease_id == short.leases[0].lease_id)
        .expect("expired lease reported");
    assert_eq!(lease_event.reason(), proto::RevocationReason::LeaseExpired);
    let task_event = events
        .iter()
        .find(|e| e.lease_id.is_empty())
        .expect("expired task reported");
    assert_eq!(task_event.task_id, short.task_id);
    assert_eq!(task_event.reason(), proto::RevocationReason::TaskExpired);
    assert!(events.iter().all(|e| e.task_id != lasting.task_id));

    let mut tokens = restarted.admin().await.tokens();
    let still_valid = tokens
        .introspect(proto::IntrospectRequest {
            token: lasting.leases[0].credential.clone(),
            audience: CRM.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(still_valid.active, "the signing key survived the restart");
    let mut agent = restarted.connect(Some(&agent_credential)).await.tasks();
    let grant = agent
        .request_grant(grant_request(&short.task_id, "crm.contacts:read", 0))
        .await
        .unwrap_err();
    assert_eq!(
        grant.code(),
        tonic::Code::FailedPrecondition,
        "an expired task accepts no grants"
    );
    restarted.stop().await;
}
