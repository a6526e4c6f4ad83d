//! Per-tool-call authorization through the real server, under Warrant's default policy (agents
//! call the catalog's tools; a refund over 10000 cents waits for an operator; mail goes to
//! example.com only): a call allowed with a single-use call token that introspection accepts
//! once, a call denied on an argument, a call stepped up on its arguments and approved, bad
//! arguments refused naming the argument, sensitive values kept out of the audit trail.

use tonic::Code;
use warrant::client::Connection;
use warrant::proto;

use crate::support::*;

const PAYMENTS: &str = "https://payments.test";
const CARD: &str = "4111111111111111";

fn refund(cents: u32) -> String {
    format!(r#"{{"order_id":"A-1","amount_cents":{cents},"card_number":"{CARD}"}}"#)
}

/// Introspects `token` for the payments service as a resource server of it.
async fn introspect(app: &TestApp, server: &str, token: &str) -> proto::IntrospectResponse {
    app.connect(Some(server))
        .await
        .tokens()
        .introspect(proto::IntrospectRequest {
            token: token.into(),
            audience: PAYMENTS.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// The digest a tool's service computes over the arguments it receives.
fn digest_of(canonical: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

async fn an_allowed_call_gets_a_token_accepted_once(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let agent = app.agent("billing-agent").await;
    let server = app.resource_server("payments-api", &[PAYMENTS]).await;
    let task_id = open_task(&agent).await;
    let answer = agent
        .tasks()
        .authorize_tool_call(tool_call(&task_id, "payments.refund", &refund(500)))
        .await
        .unwrap()
        .into_inner();
    let expected = digest_of(&format!(
        r#"{{"amount_cents":500,"card_number":"{CARD}","order_id":"A-1"}}"#
    ));
    assert_eq!(answer.arguments_digest, expected);
    let token = answer
        .call_token
        .expect("a small refund is allowed at once");
    assert_eq!(token.scope, "tool:payments.refund");
    assert_eq!(token.audience, PAYMENTS);

    let first = introspect(&app, &server, &token.credential).await;
    assert!(first.active, "the first use is accepted");
    assert_eq!(first.tool, "payments.refund");
    assert_eq!(first.arguments_digest, expected);
    assert_eq!(first.task_id, task_id);
    let replay = introspect(&app, &server, &token.credential).await;
    assert!(!replay.active, "a call token is accepted once");

    // A call token is for one call: it cannot be renewed, nor handed again by a retry.
    let renewal = agent
        .tasks()
        .renew_lease(proto::RenewLeaseRequest {
            lease_id: token.lease_id.clone(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(renewal.code(), Code::FailedPrecondition, "{renewal:?}");

    // The audit trail keeps the digest and the redacted arguments, never the card number.
    let admin = app.admin().await;
    let decided = audit_events_of_type(&admin, "tool.decided").await;
    let event = decided.first().expect("the decision is audited");
    assert_eq!(event.outcome, "allowed");
    let details: serde_json::Value = serde_json::from_str(&event.detail_json).unwrap();
    assert_eq!(details["arguments_digest"], expected);
    assert_eq!(details["arguments"]["card_number"], "[redacted]");
    assert_eq!(details["arguments"]["amount_cents"], 500);
    let exported = export_audit(&admin).await;
    assert!(exported.contains(&expected));
    assert!(
        !exported.contains(CARD),
        "a sensitive argument never reaches the audit trail"
    );
    app.stop().await;
}

async fn a_call_is_denied_on_its_arguments(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let agent = app.agent("mail-agent").await;
    let task_id = open_task(&agent).await;
    let inside = agent
        .tasks()
        .authorize_tool_call(tool_call(
            &task_id,
            "email.send",
            r#"{"to":"ana@example.com"}"#,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(inside.call_token.is_some());
    let outside = agent
        .tasks()
        .authorize_tool_call(tool_call(
            &task_id,
            "email.send",
            r#"{"to":"x@attacker.test"}"#,
        ))
        .await
        .unwrap_err();
    assert_eq!(outside.code(), Code::PermissionDenied);
    assert!(
        outside.message().contains("mail-stays-in-the-company"),
        "the refusal names the policy: {}",
        outside.message()
    );
    let denied = audit_events_of_type(&app.admin().await, "tool.decided")
        .await
        .into_iter()
        .filter(|event| event.outcome == "denied")
        .count();
    assert_eq!(denied, 1, "the denial is audited");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_stepped_up_on_its_arguments_is_approved_and_its_token_used_once() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let agent = app.agent("billing-agent").await;
    let server = app.resource_server("payments-api", &[PAYMENTS]).await;
    let operator = app.workload("alice", &[proto::Role::Operator]).await;
    let operator = app.connect(Some(&operator)).await;
    let task_id = open_task(&agent).await;
    let answer = agent
        .tasks()
        .authorize_tool_call(tool_call(&task_id, "payments.refund", &refund(25_000)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        answer.call_token.is_none(),
        "nothing is issued before approval"
    );
    let pending = answer
        .pending
        .expect("a large refund waits for an operator");
    assert_eq!(pending.scope, "tool:payments.refund");

    let listed = pending_requests(&operator).await;
    let shown = listed
        .iter()
        .find(|request| request.lease_id == pending.lease_id)
        .expect("the operator sees the call");
    let detail: serde_json::Value = serde_json::from_str(&shown.detail_json).unwrap();
    assert_eq!(detail["tool_call"]["tool"], "payments.refund");
    assert_eq!(detail["tool_call"]["arguments"]["amount_cents"], 25_000);
    assert_eq!(
        detail["tool_call"]["arguments"]["card_number"],
        "[redacted]"
    );
    assert_eq!(
        detail["tool_call"]["arguments_digest"],
        answer.arguments_digest
    );
    assert!(!shown.detail_json.contains(CARD));

    let mut stream = agent
        .tasks()
        .watch_grant(proto::WatchGrantRequest {
            lease_id: pending.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stream.message().await.unwrap().unwrap().state(),
        proto::GrantState::Pending
    );
    operator
        .approvals()
        .approve(proto::AnswerRequest {
            lease_id: pending.lease_id.clone(),
            reason: "customer called, refund is genuine".into(),
            request_digest: shown.request_digest.clone(),
        })
        .await
        .unwrap();
    let issued = tokio::time::timeout(std::time::Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(issued.state(), proto::GrantState::Issued);
    let token = issued.lease.expect("the call token comes with the stream");
    let first = introspect(&app, &server, &token.credential).await;
    assert!(first.active);
    assert_eq!(first.tool, "payments.refund");
    assert_eq!(first.arguments_digest, answer.arguments_digest);
    assert!(!introspect(&app, &server, &token.credential).await.active);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_are_refused_naming_the_field_and_nothing_is_issued() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let agent = app.agent("billing-agent").await;
    let task_id = open_task(&agent).await;
    let oversized = format!(
        r#"{{"order_id":"{}","amount_cents":1}}"#,
        "x".repeat(17_000)
    );
    for (tool, arguments, code, field) in [
        (
            "payments.refund",
            "{not json",
            Code::InvalidArgument,
            "arguments_json",
        ),
        (
            "payments.refund",
            "[1]",
            Code::InvalidArgument,
            "arguments_json",
        ),
        (
            "payments.refund",
            r#"{"order_id":"A","amount_cents":"12"}"#,
            Code::InvalidArgument,
            "arguments_json.amount_cents",
        ),
        (
            "payments.refund",
            r#"{"order_id":"A"}"#,
            Code::InvalidArgument,
            "arguments_json.amount_cents",
        ),
        (
            "payments.refund",
            r#"{"order_id":"A","amount_cents":1,"bcc":"x"}"#,
            Code::InvalidArgument,
            "arguments_json.bcc",
        ),
        (
            "payments.refund",
            &oversized,
            Code::InvalidArgument,
            "arguments_json",
        ),
        ("shell.exec", "{}", Code::InvalidArgument, "tool"),
        ("shell.run", "{}", Code::PermissionDenied, "tool"),
    ] {
        let refused = agent
            .tasks()
            .authorize_tool_call(tool_call(&task_id, tool, arguments))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), code, "{tool} {arguments:.60}: {refused:?}");
        assert!(
            refused.message().starts_with(&format!("{field}:")),
            "{tool} {arguments:.60}: {}",
            refused.message()
        );
    }
    // The tool the catalog keeps for another workload is a refusal on record; malformed
    // calls are only answered.
    let decided = audit_events_of_type(&app.admin().await, "tool.decided").await;
    let [refusal] = decided.as_slice() else {
        panic!("one decision on record: {decided:?}");
    };
    assert_eq!(refusal.outcome, "denied");
    let details: serde_json::Value = serde_json::from_str(&refusal.detail_json).unwrap();
    assert_eq!(details["policies"], serde_json::json!(["scope-catalog"]));
    assert_eq!(details["tool"], "shell.run");
    // Another workload's task is not found; an ended task is refused.
    let other = app.agent("other-agent").await;
    let foreign = other
        .tasks()
        .authorize_tool_call(tool_call(&task_id, "payments.refund", &refund(1)))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);
    agent
        .tasks()
        .complete_task(proto::CompleteTaskRequest {
            task_id: task_id.clone(),
        })
        .await
        .unwrap();
    let ended = agent
        .tasks()
        .authorize_tool_call(tool_call(&task_id, "payments.refund", &refund(1)))
        .await
        .unwrap_err();
    assert_eq!(ended.code(), Code::FailedPrecondition);
    assert_eq!(
        count_rows(&data, "leases").await,
        0,
        "no call token was issued"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completing_the_task_revokes_its_unused_call_tokens_and_tools_are_listed() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let agent = app.agent("billing-agent").await;
    let server = app.resource_server("payments-api", &[PAYMENTS]).await;
    let task_id = open_task(&agent).await;
    let listed = agent
        .tasks()
        .list_tools(proto::ListToolsRequest {
            task_id: task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tools;
    let names: Vec<&str> = listed.iter().map(|tool| tool.name.as_str()).collect();
    assert_eq!(names, ["email.send", "payments.refund"]);
    let card = listed[1]
        .arguments
        .iter()
        .find(|argument| argument.name == "card_number")
        .unwrap();
    assert!(card.sensitive && !card.required);

    let token = agent
        .tasks()
        .authorize_tool_call(tool_call(&task_id, "payments.refund", &refund(100)))
        .await
        .unwrap()
        .into_inner()
        .call_token
        .unwrap();
    agent
        .tasks()
        .complete_task(proto::CompleteTaskRequest { task_id })
        .await
        .unwrap();
    assert!(
        !introspect(&app, &server, &token.credential).await.active,
        "an unused call token ends with its task"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn postgres_a_call_token_is_accepted_once_across_two_replicas() {
    let (_data, first, second) = postgres_replicas().await;
    let agent = first.agent("billing-agent").await;
    let server = first.resource_server("payments-api", &[PAYMENTS]).await;
    let task_id = open_task(&agent).await;
    for round in 0..5 {
        let token = agent
            .tasks()
            .authorize_tool_call(tool_call(&task_id, "payments.refund", &refund(100 + round)))
            .await
            .unwrap()
            .into_inner()
            .call_token
            .unwrap()
            .credential;
        let (on_first, on_second) = tokio::join!(
            introspect(&first, &server, &token),
            introspect(&second, &server, &token)
        );
        assert_eq!(
            u8::from(on_first.active) + u8::from(on_second.active),
            1,
            "round {round}: exactly one replica accepts the call"
        );
    }
    first.stop().await;
    second.stop().await;
}

backend_tests!(
    an_allowed_call_gets_a_token_accepted_once,
    a_call_is_denied_on_its_arguments
);

/// Every audit event recorded so far, as text.
async fn export_audit(admin: &Connection) -> String {
    let events = admin
        .admin()
        .query_audit(proto::QueryAuditRequest {
            limit: 500,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(!events.is_empty());
    format!("{events:?}")
}
