//! Tasks: issuance, grants, renewal limits, completion, idempotent retries, and refusals.

use std::time::{SystemTime, UNIX_EPOCH};

use tonic::Code;
use warrant::proto;

use crate::support::*;

backend_tests!(
    begin_task_issues_one_task_scoped_token_per_scope,
    request_grant_adds_a_lease_to_an_active_task,
    renewal_extends_but_never_past_scope_maximum_or_task_deadline,
    completing_a_task_revokes_every_lease_it_holds,
    retried_begin_task_with_same_idempotency_key_returns_the_same_task,
    reused_idempotency_key_with_a_different_request_is_refused,
    forbidden_scope_refuses_the_whole_task_and_stores_nothing,
    unknown_scope_and_malformed_fields_are_invalid_arguments_naming_the_field,
    over_scoped_ttl_is_refused,
    another_workloads_task_is_not_found,
    ended_task_refuses_grants_and_renewals,
);

fn now_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn begin_task_issues_one_task_scoped_token_per_scope(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();

    let response = agent
        .begin_task(begin(&["crm.contacts:read", "tickets:write"]))
        .await
        .unwrap()
        .into_inner();

    assert!(response.task_id.starts_with("task_"));
    assert_eq!(response.leases.len(), 2);
    let crm = &response.leases[0];
    assert_eq!(crm.state(), proto::LeaseState::Issued);
    let header = header_of(&crm.credential);
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["alg"], "EdDSA");
    assert!(header["kid"].as_str().is_some_and(|kid| !kid.is_empty()));
    let claims = claims_of(&crm.credential);
    assert_eq!(claims["iss"], app.issuer);
    assert_eq!(claims["sub"], "spiffe://test.local/workload/crm-agent");
    assert_eq!(claims["aud"], CRM);
    assert_eq!(claims["scope"], "crm.contacts:read");
    assert_eq!(claims["client_id"], "crm-agent");
    assert_eq!(claims["task_id"], response.task_id);
    assert_eq!(claims["jti"], crm.lease_id);
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 300, "default TTL of the scope");
    assert!((claims["iat"].as_i64().unwrap() - now_seconds()).abs() <= 2);
    assert_eq!(
        claims_of(&response.leases[1].credential)["aud"],
        "https://tickets.test"
    );
}

async fn request_grant_adds_a_lease_to_an_active_task(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let task = agent.begin_task(begin(&[])).await.unwrap().into_inner();
    assert!(task.leases.is_empty());

    let request = grant_request(&task.task_id, "tickets:write", 120);
    let lease = agent
        .request_grant(request)
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();

    let claims = claims_of(&lease.credential);
    assert_eq!(claims["task_id"], task.task_id);
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        120
    );
    let mut tokens = app.admin().await.tokens();
    let introspection = tokens
        .introspect(proto::IntrospectRequest {
            token: lease.credential,
            audience: "https://tickets.test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(introspection.active);
}

async fn renewal_extends_but_never_past_scope_maximum_or_task_deadline(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let mut request = begin(&["crm.contacts:read"]);
    request.ttl_seconds = 420;
    let task = agent.begin_task(request).await.unwrap().into_inner();
    let lease = &task.leases[0];
    let first_exp = claims_of(&lease.credential)["exp"].as_i64().unwrap();
    let deadline = task.deadline.unwrap().seconds;

    let renewed = agent
        .renew_lease(renew_request(&lease.lease_id, 600))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    let renewed_claims = claims_of(&renewed.credential);
    assert_eq!(
        renewed_claims["jti"], lease.lease_id,
        "renewal keeps the lease id"
    );
    assert!(renewed_claims["exp"].as_i64().unwrap() > first_exp);
    assert_eq!(
        renewed_claims["exp"].as_i64().unwrap(),
        deadline,
        "capped at the task deadline"
    );

    let again = agent.renew_lease(renew_request(&lease.lease_id, 0)).await;
    let status = again.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("lease_id"),
        "{}",
        status.message()
    );

    let too_long = agent.renew_lease(renew_request(&lease.lease_id, 601)).await;
    assert_eq!(
        too_long.unwrap_err().code(),
        Code::InvalidArgument,
        "more than the scope's max_ttl"
    );
}

async fn completing_a_task_revokes_every_lease_it_holds(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let task = agent
        .begin_task(begin(&["crm.contacts:read", "tickets:write"]))
        .await
        .unwrap()
        .into_inner();
    let extra = agent
        .request_grant(grant_request(&task.task_id, "crm.contacts:read", 0))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();

    let completed = agent
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(completed.state(), proto::TaskState::Completed);
    let mut revoked = completed.revoked_lease_ids.clone();
    revoked.sort();
    let mut expected: Vec<String> = task
        .leases
        .iter()
        .map(|l| l.lease_id.clone())
        .chain([extra.lease_id.clone()])
        .collect();
    expected.sort();
    assert_eq!(revoked, expected);
    let mut tokens = app.admin().await.tokens();
    for (token, audience) in [
        (&task.leases[0].credential, CRM),
        (&task.leases[1].credential, "https://tickets.test"),
        (&extra.credential, CRM),
    ] {
        let answer = tokens
            .introspect(proto::IntrospectRequest {
                token: token.clone(),
                audience: audience.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!answer.active);
    }

    let retry = agent
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap()
        .into_inner();
    assert!(retry.already_completed);
    assert!(retry.revoked_lease_ids.is_empty());
}

async fn retried_begin_task_with_same_idempotency_key_returns_the_same_task(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let mut request = begin(&["crm.contacts:read"]);
    request.idempotency_key = "job-42-step-1".into();

    let first = agent
        .begin_task(request.clone())
        .await
        .unwrap()
        .into_inner();
    let retry = agent
        .begin_task(request.clone())
        .await
        .unwrap()
        .into_inner();

    assert!(!first.replayed);
    assert!(retry.replayed);
    assert_eq!(retry.task_id, first.task_id);
    assert_eq!(retry.leases.len(), 1);
    assert_eq!(retry.leases[0].lease_id, first.leases[0].lease_id);
    assert_eq!(
        retry.leases[0].credential, first.leases[0].credential,
        "Ed25519 re-signs the same claims identically"
    );
    assert_eq!(count_rows(&data, "tasks").await, 1);
    assert_eq!(count_rows(&data, "leases").await, 1);

    let other_agent = app.agent("other-agent").await;
    let theirs = other_agent
        .tasks()
        .begin_task(request)
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        theirs.task_id, first.task_id,
        "idempotency keys are per workload"
    );
}

async fn reused_idempotency_key_with_a_different_request_is_refused(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let mut request = begin(&["crm.contacts:read"]);
    request.idempotency_key = "job-7".into();
    agent.begin_task(request.clone()).await.unwrap();

    request.scopes.push("tickets:write".into());
    let status = agent.begin_task(request).await.unwrap_err();

    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().starts_with("idempotency_key:"),
        "{}",
        status.message()
    );
    assert_eq!(count_rows(&data, "leases").await, 1);
}

async fn forbidden_scope_refuses_the_whole_task_and_stores_nothing(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();

    let status = agent
        .begin_task(begin(&["crm.contacts:read", "payments:refund"]))
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("scopes[1]"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("payments:refund"),
        "{}",
        status.message()
    );
    assert_eq!(count_rows(&data, "tasks").await, 0);
    assert_eq!(count_rows(&data, "leases").await, 0);

    let task = agent.begin_task(begin(&[])).await.unwrap().into_inner();
    let grant = agent
        .request_grant(grant_request(&task.task_id, "payments:refund", 0))
        .await
        .unwrap_err();
    assert_eq!(grant.code(), Code::PermissionDenied);
    assert_eq!(count_rows(&data, "leases").await, 0);

    let billing = app.agent("billing-agent").await.tasks();
    let allowed = billing
        .clone()
        .begin_task(begin(&["payments:refund"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.leases.len(), 1);
}

async fn unknown_scope_and_malformed_fields_are_invalid_arguments_naming_the_field(
    backend: Backend,
) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let with = |change: fn(&mut proto::BeginTaskRequest)| {
        let mut request = begin(&["crm.contacts:read"]);
        change(&mut request);
        request
    };
    let cases: Vec<(proto::BeginTaskRequest, &str)> = vec![
        (with(|r| r.scopes.push("nope:read".into())), "scopes[1]"),
        (
            with(|r| r.scopes.push("crm.contacts:read".into())),
            "scopes[1]",
        ),
        (with(|r| r.scopes = vec!["bad scope".into()]), "scopes[0]"),
        (
            with(|r| r.scopes = (0..33).map(|i| format!("s{i}")).collect()),
            "scopes",
        ),
        (with(|r| r.purpose = String::new()), "purpose"),
        (with(|r| r.purpose = "x".repeat(513)), "purpose"),
        (with(|r| r.ttl_seconds = 0), "ttl_seconds"),
        (with(|r| r.ttl_seconds = 3601), "ttl_seconds"),
        (
            with(|r| r.context.as_mut().unwrap().prompt_digest = "the raw prompt".into()),
            "context.prompt_digest",
        ),
        (
            with(|r| r.context.as_mut().unwrap().planned_tools = vec!["t".into(); 33]),
            "context.planned_tools",
        ),
        (
            with(|r| r.context.as_mut().unwrap().planned_tools = vec!["a\nb".into()]),
            "context.planned_tools[0]",
        ),
        (
            with(|r| r.idempotency_key = "k".repeat(129)),
            "idempotency_key",
        ),
    ];
    for (request, field) in cases {
        let status = agent.begin_task(request).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{field}: {}",
            status.message()
        );
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "expected {field}: got {}",
            status.message()
        );
    }
    for bad_id in [
        "",
        "task_123",
        "lease_0123456789abcdef0123456789abcdef",
        "task_../../etc",
    ] {
        let status = agent
            .request_grant(grant_request(bad_id, "crm.contacts:read", 0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with("task_id:"),
            "{}",
            status.message()
        );
    }
    let status = agent
        .renew_lease(renew_request("task_0", 0))
        .await
        .unwrap_err();
    assert!(
        status.message().starts_with("lease_id:"),
        "{}",
        status.message()
    );
    assert_eq!(count_rows(&data, "tasks").await, 0);
}

async fn over_scoped_ttl_is_refused(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let task = agent.begin_task(begin(&[])).await.unwrap().into_inner();

    let status = agent
        .request_grant(grant_request(&task.task_id, "crm.contacts:read", 601))
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("ttl_seconds:"),
        "{}",
        status.message()
    );
}

async fn another_workloads_task_is_not_found(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut owner = app.agent("owner-agent").await.tasks();
    let mut intruder = app.agent("intruder-agent").await.tasks();
    let task = owner
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap()
        .into_inner();

    let grant = intruder
        .request_grant(grant_request(&task.task_id, "crm.contacts:read", 0))
        .await
        .unwrap_err();
    let renew = intruder
        .renew_lease(renew_request(&task.leases[0].lease_id, 0))
        .await
        .unwrap_err();
    let complete = intruder
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap_err();
    let unknown = owner
        .complete_task(complete_request(&format!("task_{}", "0".repeat(32))))
        .await
        .unwrap_err();

    for status in [grant, renew, complete, unknown] {
        assert_eq!(status.code(), Code::NotFound, "{}", status.message());
    }
    let mut tokens = app.admin().await.tokens();
    let still = tokens
        .introspect(proto::IntrospectRequest {
            token: task.leases[0].credential.clone(),
            audience: CRM.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        still.into_inner().active,
        "the intruder's attempts changed nothing"
    );
}

async fn ended_task_refuses_grants_and_renewals(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let task = agent
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap()
        .into_inner();
    agent
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap();

    let grant = agent
        .request_grant(grant_request(&task.task_id, "crm.contacts:read", 0))
        .await
        .unwrap_err();
    let renew = agent
        .renew_lease(renew_request(&task.leases[0].lease_id, 0))
        .await
        .unwrap_err();

    assert_eq!(grant.code(), Code::FailedPrecondition);
    assert_eq!(renew.code(), Code::FailedPrecondition);
    assert_eq!(count_rows(&data, "leases").await, 1);
}
