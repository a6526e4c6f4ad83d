//! Approval gates through the real server: a grant that policy steps up waits for a quorum of
//! distinct operators; the agent blocked on `WatchGrant` receives its credential the moment the
//! quorum is reached; self-approval, a missing approver label, a second answer by the same
//! operator, a denial, an expiry and the end of the task all behave as the rules say; two
//! brokers on one PostgreSQL answering at once issue one credential.

use std::time::Duration;

use tonic::Code;
use warrant::client::Connection;
use warrant::config::Config;
use warrant::policy::PolicySource;
use warrant::proto;

use crate::support::*;

/// `tickets:write` needs two operators of team=ops; `crm.contacts:read` one operator within 10 s.
const POLICY: &str = r#"
@id("agents-request-catalog-scopes")
permit (principal in Warrant::Role::"agent", action == Warrant::Action::"RequestGrant", resource);

@id("writes-need-two-from-ops")
@approval
@quorum("2")
@approver_label("team=ops")
permit (principal, action, resource == Warrant::Scope::"tickets:write");

@id("reads-need-one-quickly")
@approval
@wait("10s")
permit (principal, action, resource == Warrant::Scope::"crm.contacts:read")
when { context has risk && context.risk >= 50 };
"#;

fn config_with_policy(data: &TestData) -> Config {
    let dir = data.path().join("policy");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("approvals.cedar"), POLICY).unwrap();
    let mut config = data.config();
    config.policy = PolicySource::Dir(dir);
    config
}

/// Registers `name` with `roles` and `labels`; a connection acting as it.
async fn register(
    app: &TestApp,
    name: &str,
    roles: &[proto::Role],
    labels: &[(&str, &str)],
) -> Connection {
    let credential = app
        .admin()
        .await
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            name: name.into(),
            roles: roles.iter().map(|role| *role as i32).collect(),
            labels: labels
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .credential;
    app.connect(Some(&credential)).await
}

async fn operator(app: &TestApp, name: &str) -> Connection {
    register(app, name, &[proto::Role::Operator], &[("team", "ops")]).await
}

/// Opens a task as `agent` and asks for `scope` with `risk`; the pending answer.
async fn ask(agent: &Connection, scope: &str, risk: Option<u32>) -> (String, proto::GrantStatus) {
    let task = agent
        .tasks()
        .begin_task(begin(&[]))
        .await
        .unwrap()
        .into_inner();
    let answer = agent
        .tasks()
        .request_grant(proto::RequestGrantRequest {
            risk,
            ..grant_request(&task.task_id, scope, 0)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.lease.is_none(), "nothing is issued before approval");
    (task.task_id, answer.pending.expect("the grant waits"))
}

fn answer(lease_id: &str, reason: &str) -> proto::AnswerRequest {
    proto::AnswerRequest {
        lease_id: lease_id.into(),
        reason: reason.into(),
        request_digest: String::new(),
    }
}

async fn watch(agent: &Connection, lease_id: &str) -> tonic::Streaming<proto::GrantStatus> {
    agent
        .tasks()
        .watch_grant(proto::WatchGrantRequest {
            lease_id: lease_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next(stream: &mut tonic::Streaming<proto::GrantStatus>) -> proto::GrantStatus {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a status within 5 s")
        .unwrap()
        .expect("the stream is open")
}

async fn a_quorum_of_two_operators_issues_the_credential_to_the_waiting_agent(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn_with(config_with_policy(&data)).await;
    let agent = app.agent("support-agent").await;
    let (first, second) = (operator(&app, "alice").await, operator(&app, "bob").await);
    let (_, pending) = ask(&agent, "tickets:write", None).await;
    assert_eq!(pending.state(), proto::GrantState::Pending);
    assert_eq!((pending.approvals, pending.quorum), (0, 2));

    let listed = pending_requests(&first).await;
    let shown = listed
        .iter()
        .find(|request| request.lease_id == pending.lease_id)
        .expect("operators see the request");
    assert_eq!(shown.workload, "support-agent");
    assert_eq!(shown.approver_labels, ["team=ops"]);
    let detail: serde_json::Value = serde_json::from_str(&shown.detail_json).unwrap();
    assert_eq!(detail["purpose"], "summarise open tickets");
    assert_eq!(
        detail["approval_rules"],
        serde_json::json!(["writes-need-two-from-ops"])
    );

    let mut stream = watch(&agent, &pending.lease_id).await;
    assert_eq!(next(&mut stream).await.state(), proto::GrantState::Pending);
    let once = first
        .approvals()
        .approve(proto::AnswerRequest {
            request_digest: shown.request_digest.clone(),
            ..answer(&pending.lease_id, "ticket T-1 is real")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(once.counted);
    assert_eq!(
        (once.state(), once.approvals),
        (proto::GrantState::Pending, 1)
    );
    assert_eq!(next(&mut stream).await.approvals, 1);
    let shown = pending_requests(&second).await;
    let approvals: Vec<&str> = shown[0]
        .approvals
        .iter()
        .map(|a| a.approver.as_str())
        .collect();
    assert_eq!(approvals, ["alice"], "operators see the approvals so far");
    // The same operator approving again counts once.
    let twice = first
        .approvals()
        .approve(answer(&pending.lease_id, "again"))
        .await
        .unwrap()
        .into_inner();
    assert!(!twice.counted);
    assert_eq!(twice.approvals, 1);

    let approved_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let last = second
        .approvals()
        .approve(answer(&pending.lease_id, "agreed"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(last.state(), proto::GrantState::Issued);
    let issued = next(&mut stream).await;
    assert_eq!(issued.state(), proto::GrantState::Issued);
    let lease = issued
        .lease
        .expect("the issued lease comes with the stream");
    assert_eq!(lease.lease_id, pending.lease_id);
    assert!(
        lease.issued_at.unwrap().seconds >= approved_at - 1,
        "the TTL starts at the approval, not at the request"
    );
    assert!(
        app.is_active(&lease.credential, "https://tickets.test")
            .await
    );
    assert!(
        stream.message().await.unwrap().is_none(),
        "the stream ends once issued"
    );

    let approvals = audit_events_of_type(&app.admin().await, "grant.approved").await;
    assert_eq!(approvals.len(), 2, "the repeated approval left no event");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_approves_their_own_request_and_approvers_need_the_rules_label() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn_with(config_with_policy(&data)).await;
    // An agent that is also an operator of team=ops.
    let both = register(
        &app,
        "agent-operator",
        &[proto::Role::Agent, proto::Role::Operator],
        &[("team", "ops")],
    )
    .await;
    let (_, pending) = ask(&both, "tickets:write", None).await;
    let own = both
        .approvals()
        .approve(answer(&pending.lease_id, "looks fine to me"))
        .await
        .unwrap_err();
    assert_eq!(own.code(), Code::PermissionDenied);
    assert!(
        own.message().contains("may not answer it"),
        "{}",
        own.message()
    );

    let outsider = register(
        &app,
        "carol",
        &[proto::Role::Operator],
        &[("team", "sales")],
    )
    .await;
    let unlabelled = outsider
        .approvals()
        .approve(answer(&pending.lease_id, "ok"))
        .await
        .unwrap_err();
    assert_eq!(unlabelled.code(), Code::PermissionDenied);
    assert!(
        unlabelled.message().contains("team=ops"),
        "{}",
        unlabelled.message()
    );

    // An agent without the operator role cannot call Approvals at all, nor follow another
    // workload's request: its id is as unknown to it as an invented one.
    let agent = app.agent("plain-agent").await;
    let foreign = agent
        .tasks()
        .watch_grant(proto::WatchGrantRequest {
            lease_id: pending.lease_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);
    let refused = agent
        .approvals()
        .approve(answer(&pending.lease_id, "ok"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Bad input, nothing changed: a digest that is not the request's, no reason, an unknown id.
    let alice = operator(&app, "alice").await;
    let wrong = alice
        .approvals()
        .approve(proto::AnswerRequest {
            request_digest: "0".repeat(64),
            ..answer(&pending.lease_id, "ok")
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::FailedPrecondition);
    assert!(
        wrong.message().starts_with("request_digest:"),
        "{}",
        wrong.message()
    );
    let silent = alice
        .approvals()
        .approve(answer(&pending.lease_id, " "))
        .await
        .unwrap_err();
    assert_eq!(silent.code(), Code::InvalidArgument);
    assert!(
        silent.message().starts_with("reason:"),
        "{}",
        silent.message()
    );
    let unknown = alice
        .approvals()
        .approve(answer(&format!("lease_{}", "0".repeat(32)), "ok"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let malformed = alice
        .approvals()
        .approve(answer("nope", "ok"))
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    let status = next(&mut watch(&both, &pending.lease_id).await).await;
    assert_eq!(
        (status.state(), status.approvals),
        (proto::GrantState::Pending, 0)
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_denial_ends_the_request_and_completion_cancels_the_others() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn_with(config_with_policy(&data)).await;
    let agent = app.agent("support-agent").await;
    let (alice, bob) = (operator(&app, "alice").await, operator(&app, "bob").await);

    let (_, denied) = ask(&agent, "tickets:write", None).await;
    let mut stream = watch(&agent, &denied.lease_id).await;
    next(&mut stream).await;
    alice
        .approvals()
        .approve(answer(&denied.lease_id, "fine"))
        .await
        .unwrap();
    next(&mut stream).await;
    let no = bob
        .approvals()
        .deny(answer(&denied.lease_id, "not during the freeze"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(no.state(), proto::GrantState::Denied);
    let last = next(&mut stream).await;
    assert_eq!(last.state(), proto::GrantState::Denied);
    assert_eq!(last.reason, "not during the freeze");
    assert!(last.lease.is_none());
    let late = alice
        .approvals()
        .approve(answer(&denied.lease_id, "hm"))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert!(
        late.message().contains("already denied"),
        "{}",
        late.message()
    );

    // An operator who approved and then thinks better of it denies: the denial wins.
    let (_, rethought) = ask(&agent, "tickets:write", None).await;
    alice
        .approvals()
        .approve(answer(&rethought.lease_id, "fine"))
        .await
        .unwrap();
    let changed = alice
        .approvals()
        .deny(answer(&rethought.lease_id, "wrong ticket, sorry"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.state(), proto::GrantState::Denied);
    assert!(changed.counted);
    let refused = bob
        .approvals()
        .approve(answer(&rethought.lease_id, "ok"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    let (task_id, cancelled) = ask(&agent, "tickets:write", None).await;
    let mut stream = watch(&agent, &cancelled.lease_id).await;
    next(&mut stream).await;
    agent
        .tasks()
        .complete_task(complete_request(&task_id))
        .await
        .unwrap();
    let ended = next(&mut stream).await;
    assert_eq!(ended.state(), proto::GrantState::Cancelled);
    let after = alice
        .approvals()
        .approve(answer(&cancelled.lease_id, "ok"))
        .await
        .unwrap_err();
    assert_eq!(after.code(), Code::FailedPrecondition);
    let listed = pending_requests(&alice).await;
    assert!(listed.is_empty(), "{listed:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecided_request_expires_and_a_late_approval_is_refused() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn_with(config_with_policy(&data)).await;
    let agent = app.agent("support-agent").await;
    // The risk signal steps up a read that is otherwise free, with a 10 s wait.
    let (_, pending) = ask(&agent, "crm.contacts:read", Some(70)).await;
    assert_eq!(pending.quorum, 1);
    let mut stream = watch(&agent, &pending.lease_id).await;
    assert_eq!(next(&mut stream).await.state(), proto::GrantState::Pending);
    let expired = tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("the stream reports the expiry")
        .unwrap()
        .unwrap();
    assert_eq!(expired.state(), proto::GrantState::Expired);
    let late = operator(&app, "alice")
        .await
        .approvals()
        .approve(answer(&pending.lease_id, "sorry, late"))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert!(late.message().contains("expired"), "{}", late.message());
    // The housekeeping loop recorded the expiry too.
    let admin = app.admin().await;
    let recorded = eventually(Duration::from_secs(5), || async {
        audit_events_of_type(&admin, "grant.expired")
            .await
            .iter()
            .any(|event| event.lease_id == pending.lease_id)
    })
    .await;
    assert!(recorded, "grant.expired is in the audit trail");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn postgres_two_brokers_answering_at_once_issue_one_credential() {
    let data = TestData::new(Backend::Postgres).await;
    let mut config = config_with_policy(&data);
    config.issuer = Some("https://warrant.test".into());
    let first = TestApp::spawn_with(config.clone()).await;
    let mut second = TestApp::spawn_with(config).await;
    second.admin_token = first.admin_token.clone();
    let agent = first.agent("support-agent").await;
    for round in 0..5 {
        let (alice, bob) = (
            operator(&first, &format!("alice-{round}")).await,
            operator(&second, &format!("bob-{round}")).await,
        );
        let (_, pending) = ask(&agent, "tickets:write", None).await;
        let (on_first, on_second) = tokio::join!(
            async {
                alice
                    .approvals()
                    .approve(answer(&pending.lease_id, "yes"))
                    .await
            },
            async {
                bob.approvals()
                    .approve(answer(&pending.lease_id, "yes"))
                    .await
            },
        );
        let states = [
            on_first.unwrap().into_inner().state(),
            on_second.unwrap().into_inner().state(),
        ];
        assert!(
            states.contains(&proto::GrantState::Issued),
            "the second answer saw the first: {states:?}"
        );
        let issued: Vec<_> = audit_events_of_type(&first.admin().await, "lease.issued")
            .await
            .into_iter()
            .filter(|event| event.lease_id == pending.lease_id)
            .collect();
        assert_eq!(issued.len(), 1, "exactly one credential for round {round}");
    }
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_workload_cannot_bury_the_operators_under_requests() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn_with(config_with_policy(&data)).await;
    let agent = app.agent("chatty-agent").await;
    let task = agent
        .tasks()
        .begin_task(begin(&[]))
        .await
        .unwrap()
        .into_inner();
    let ask_again = || {
        let mut tasks = agent.tasks();
        let request = grant_request(&task.task_id, "tickets:write", 0);
        async move { tasks.request_grant(request).await }
    };
    for _ in 0..20 {
        let answer = ask_again().await.unwrap().into_inner();
        assert!(answer.pending.is_some());
    }
    let refused = ask_again().await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("at most 20"),
        "{}",
        refused.message()
    );
    // Another workload's requests still get through, and operators page through all of them.
    let other = app.agent("quiet-agent").await;
    ask(&other, "tickets:write", None).await;
    let alice = operator(&app, "alice").await;
    let first_page = alice
        .approvals()
        .list_pending(proto::ListPendingRequest {
            page_size: 15,
            page_token: String::new(),
            filter: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first_page.requests.len(), 15);
    let second_page = alice
        .approvals()
        .list_pending(proto::ListPendingRequest {
            page_size: 15,
            page_token: first_page.next_page_token,
            filter: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second_page.requests.len(), 6);
    assert!(second_page.next_page_token.is_empty());
    app.stop().await;
}

/// The next request on a `WatchPending` stream, within 5 s.
async fn next_pending(stream: &mut tonic::Streaming<proto::PendingGrant>) -> proto::PendingGrant {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a request within 5 s")
        .unwrap()
        .expect("the stream is open")
}

fn only(workload: &str, scope: &str) -> Option<proto::PendingFilter> {
    Some(proto::PendingFilter {
        workload: workload.into(),
        scope: scope.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_each_new_request_once_as_it_arrives_and_filter_them() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn_with(config_with_policy(&data)).await;
    let tickets = app.agent("ticket-agent").await;
    let crm = app.agent("crm-agent").await;
    let alice = operator(&app, "alice").await;
    let (_, waiting) = ask(&tickets, "tickets:write", None).await;

    let watch_pending = |filter| {
        let mut approvals = alice.approvals();
        async move {
            approvals
                .watch_pending(proto::WatchPendingRequest { filter })
                .await
                .map(|response| response.into_inner())
        }
    };
    let mut everything = watch_pending(None).await.unwrap();
    let mut crm_only = watch_pending(only("crm-agent", "")).await.unwrap();
    assert_eq!(
        next_pending(&mut everything).await.lease_id,
        waiting.lease_id
    );

    let (_, from_crm) = ask(&crm, "crm.contacts:read", Some(80)).await;
    let seen = next_pending(&mut everything).await;
    assert_eq!(
        seen.lease_id, from_crm.lease_id,
        "a new request arrives at once"
    );
    assert_eq!(seen.workload, "crm-agent");
    assert_eq!(
        next_pending(&mut crm_only).await.lease_id,
        from_crm.lease_id
    );
    // Each request once: the stream's next looks (a second apart) list them again.
    let quiet = tokio::time::timeout(Duration::from_millis(2500), everything.message()).await;
    assert!(quiet.is_err(), "nothing new, nothing sent: {quiet:?}");
    // Another ticket request is not the CRM agent's: its stream stays silent, the other's not.
    let (_, second_ticket) = ask(&tickets, "tickets:write", None).await;
    assert_eq!(
        next_pending(&mut everything).await.lease_id,
        second_ticket.lease_id
    );
    let (_, second_crm) = ask(&crm, "crm.contacts:read", Some(90)).await;
    assert_eq!(
        next_pending(&mut crm_only).await.lease_id,
        second_crm.lease_id,
        "the filtered stream skipped the ticket request"
    );

    let listed = alice
        .approvals()
        .list_pending(proto::ListPendingRequest {
            filter: only("", "tickets:write"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .requests;
    let ids: Vec<&str> = listed
        .iter()
        .map(|request| request.lease_id.as_str())
        .collect();
    assert_eq!(
        ids,
        [waiting.lease_id.as_str(), second_ticket.lease_id.as_str()]
    );

    for (filter, field) in [
        (only("Not A Name!", ""), "filter.workload"),
        (only("", "no spaces allowed"), "filter.scope"),
    ] {
        let refused = watch_pending(filter).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(
            refused.message().starts_with(field),
            "{}",
            refused.message()
        );
    }
    let agent_watch = tickets
        .approvals()
        .watch_pending(proto::WatchPendingRequest::default())
        .await
        .unwrap_err();
    assert_eq!(agent_watch.code(), Code::PermissionDenied);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_task_opens_with_the_allowed_scopes_and_holds_the_stepped_up_ones() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn_with(config_with_policy(&data)).await;
    let agent = app.agent("support-agent").await;
    let (first, second) = (operator(&app, "alice").await, operator(&app, "bob").await);
    let request = proto::BeginTaskRequest {
        idempotency_key: "ticket-T-9".into(),
        ..begin(&["crm.contacts:read", "tickets:write"])
    };
    let opened = agent
        .tasks()
        .begin_task(request.clone())
        .await
        .unwrap()
        .into_inner();
    let scopes: Vec<&str> = opened.leases.iter().map(|l| l.scope.as_str()).collect();
    assert_eq!(scopes, ["crm.contacts:read"], "the read is issued at once");
    assert!(!opened.leases[0].credential.is_empty());
    let [waiting] = opened.pending.as_slice() else {
        panic!("one scope waits: {:?}", opened.pending);
    };
    assert_eq!(waiting.scope, "tickets:write");
    assert_eq!(waiting.state(), proto::GrantState::Pending);
    assert_eq!(waiting.quorum, 2);

    // A retry answers the same waiting request, not a second one.
    let retried = agent
        .tasks()
        .begin_task(request)
        .await
        .unwrap()
        .into_inner();
    assert!(retried.replayed);
    let ids: Vec<&str> = retried
        .pending
        .iter()
        .map(|p| p.lease_id.as_str())
        .collect();
    assert_eq!(ids, [waiting.lease_id.as_str()]);
    let listed = pending_requests(&first).await;
    assert_eq!(listed.len(), 1);

    let mut stream = watch(&agent, &waiting.lease_id).await;
    assert_eq!(next(&mut stream).await.state(), proto::GrantState::Pending);
    for operator in [&first, &second] {
        operator
            .approvals()
            .approve(answer(&waiting.lease_id, "the ticket needs an update"))
            .await
            .unwrap();
    }
    let issued = loop {
        let status = next(&mut stream).await;
        if status.state() == proto::GrantState::Issued {
            break status;
        }
    };
    let lease = issued.lease.expect("the credential comes with the stream");
    assert_eq!(lease.scope, "tickets:write");
    assert!(
        app.is_active(&lease.credential, "https://tickets.test")
            .await
    );
    app.stop().await;
}

backend_tests!(a_quorum_of_two_operators_issues_the_credential_to_the_waiting_agent);
