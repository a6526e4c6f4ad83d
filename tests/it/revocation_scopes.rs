//! Revoking by workload and by scope, through the real server and the CLI: every lease in the
//! target ends at once, each is reported on the revocation feed, and nothing outside the
//! target is touched.

use std::collections::BTreeSet;
use std::time::Duration;

use tonic::Code;
use warrant::proto;
use warrant::proto::revoke_request::Target;

use crate::support::*;

async fn revoke(app: &TestApp, target: Target) -> Result<BTreeSet<String>, tonic::Status> {
    app.admin()
        .await
        .admin()
        .revoke(proto::RevokeRequest {
            target: Some(target),
        })
        .await
        .map(|response| {
            response
                .into_inner()
                .revoked_lease_ids
                .into_iter()
                .collect()
        })
}

/// The lease ids the feed reports revoked, reading until `wanted` are seen.
async fn revoked_on_feed(app: &TestApp, wanted: &BTreeSet<String>) -> BTreeSet<String> {
    let mut stream = app
        .admin()
        .await
        .tokens()
        .watch_revocations(proto::WatchRevocationsRequest { cursor: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut seen = BTreeSet::new();
    while !wanted.is_subset(&seen) {
        let batch = tokio::time::timeout(Duration::from_secs(6), stream.message())
            .await
            .expect("the feed reports them in time")
            .unwrap()
            .unwrap();
        seen.extend(
            batch
                .events
                .into_iter()
                .filter(|event| event.reason() == proto::RevocationReason::Revoked)
                .map(|event| event.lease_id),
        );
    }
    seen
}

fn lease_ids(task: &proto::BeginTaskResponse) -> BTreeSet<String> {
    task.leases
        .iter()
        .map(|lease| lease.lease_id.clone())
        .collect()
}

async fn revoking_a_workload_or_a_scope_ends_exactly_its_leases(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let agent = app.agent("crm-agent").await;
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let task = agent
            .tasks()
            .begin_task(begin(&["crm.contacts:read", "tickets:write"]))
            .await
            .unwrap()
            .into_inner();
        tasks.push(task);
    }
    let bystander = app
        .begin_as("other-agent", &["crm.contacts:read", "tickets:write"])
        .await;

    // By workload: both of its tasks, nothing of the other agent's.
    let revoked = revoke(&app, Target::Workload("crm-agent".into()))
        .await
        .unwrap();
    let expected: BTreeSet<String> = tasks.iter().flat_map(lease_ids).collect();
    assert_eq!(revoked, expected);
    for task in &tasks {
        let crm = &task.leases[0];
        assert_eq!(crm.scope, "crm.contacts:read");
        assert!(
            !app.is_active(&crm.credential, CRM).await,
            "its tokens are dead"
        );
    }
    assert!(app.is_active(&bystander.leases[0].credential, CRM).await);
    let status = agent
        .tasks()
        .request_grant(grant_request(&tasks[0].task_id, "crm.contacts:read", 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "its tasks ended");
    // Its identity stays: it can open a new task.
    let fresh = agent
        .tasks()
        .begin_task(begin(&["tickets:write"]))
        .await
        .unwrap()
        .into_inner();

    // By scope: every issued tickets:write lease, whoever holds it; the crm lease stays.
    let revoked = revoke(&app, Target::Scope("tickets:write".into()))
        .await
        .unwrap();
    let tickets = |task: &proto::BeginTaskResponse| {
        task.leases
            .iter()
            .find(|lease| lease.scope == "tickets:write")
            .unwrap()
            .lease_id
            .clone()
    };
    assert_eq!(
        revoked,
        BTreeSet::from([tickets(&bystander), tickets(&fresh)])
    );
    assert!(app.is_active(&bystander.leases[0].credential, CRM).await);

    // The feed reports every one of them.
    let all: BTreeSet<String> = expected.union(&revoked).cloned().collect();
    assert!(all.is_subset(&revoked_on_feed(&app, &all).await));

    // Unknown targets are named.
    let status = revoke(&app, Target::Scope("nope:none".into()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("scope"),
        "{}",
        status.message()
    );
    let status = revoke(&app, Target::Workload("nobody".into()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    app.stop().await;
}

backend_tests!(revoking_a_workload_or_a_scope_ends_exactly_its_leases);

/// `warrant admin revoke --scope` through the real binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_revokes_by_scope() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let task = app.begin_as("crm-agent", &["crm.contacts:read"]).await;
    let (address, token) = (app.address(), app.admin_token.clone());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(warrant_binary())
            .args(["admin", "revoke", "--scope", "crm.contacts:read"])
            .env("WARRANT_ADDR", address)
            .env("WARRANT_TOKEN", token)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout, format!("revoked {}\n", task.leases[0].lease_id));
    assert!(!app.is_active(&task.leases[0].credential, CRM).await);
    app.stop().await;
}
