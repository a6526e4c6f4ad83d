//! Checks at use, through the real server: a scope's `max_uses` is counted exactly at each
//! accepted introspection (also by two replicas at once), and a resource server that names
//! the action it is about to take gets the policy set's `UseToken` decision for the token's
//! holder, recorded in the audit trail; a refused use does not consume one.

use tonic::Code;
use warrant::client::Connection;
use warrant::policy::PolicySource;
use warrant::proto;
use warrant::verifier::{Verifier, VerifierConfig, VerifyError};

use crate::support::*;

const REPORTS: &str = "https://reports.test";

fn introspection(token: &str, audience: &str, action: &str) -> proto::IntrospectRequest {
    proto::IntrospectRequest {
        token: token.into(),
        audience: audience.into(),
        action: action.into(),
        resource: if action.is_empty() {
            String::new()
        } else {
            "report/7".into()
        },
        ..Default::default()
    }
}

async fn introspect(
    server: &Connection,
    token: &str,
    audience: &str,
    action: &str,
) -> proto::IntrospectResponse {
    introspect_with(server, introspection(token, audience, action)).await
}

async fn a_lease_is_accepted_max_uses_times(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let server = app
        .connect(Some(&app.resource_server("reports-api", &[REPORTS]).await))
        .await;
    let task = app.begin_as("report-agent", &["reports:export"]).await;
    let token = &task.leases[0].credential;
    assert_eq!(
        claims_of(token)["max_uses"],
        3,
        "the token says it is limited"
    );
    // So an offline check, which cannot count, sends it to introspection.
    let credential = app.resource_server("reports-verifier", &[REPORTS]).await;
    let verifier = Verifier::connect(VerifierConfig::new(app.address(), REPORTS, credential))
        .await
        .unwrap();
    assert!(matches!(
        verifier.verify(token).await,
        Err(VerifyError::UseNeedsIntrospection)
    ));

    for expected in 1..=3 {
        let answer = introspect(&server, token, REPORTS, "").await;
        assert!(answer.active, "use {expected} of 3: {}", answer.reason);
        assert_eq!(answer.uses, expected);
    }
    let refused = introspect(&server, token, REPORTS, "").await;
    assert!(!refused.active, "a fourth use is refused");
    assert!(refused.reason.contains("use limit"), "{}", refused.reason);
    assert_eq!(refused.scope, "", "an inactive answer carries no claims");

    // An unlimited scope counts nothing.
    let other = app.begin_as("crm-agent", &["crm.contacts:read"]).await;
    let answer = introspect(&app.admin().await, &other.leases[0].credential, CRM, "").await;
    assert!(answer.active);
    assert_eq!(answer.uses, 0);

    let events = audit_events_of_type(&app.admin().await, "token.introspected").await;
    let counted: Vec<_> = events
        .iter()
        .filter_map(|event| {
            let detail: serde_json::Value = serde_json::from_str(&event.detail_json).unwrap();
            detail["uses"].as_u64()
        })
        .collect();
    assert_eq!(
        counted.len(),
        3,
        "each accepted use is audited with its count"
    );
    app.stop().await;
}

backend_tests!(a_lease_is_accepted_max_uses_times);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn postgres_two_replicas_accept_exactly_max_uses() {
    let (_data, first, second) = postgres_replicas().await;
    let credential = first.resource_server("reports-api", &[REPORTS]).await;
    let servers = [
        first.connect(Some(&credential)).await,
        second.connect(Some(&credential)).await,
    ];
    for round in 0..3 {
        let task = first
            .begin_as(&format!("report-agent-{round}"), &["reports:export"])
            .await;
        let token = task.leases[0].credential.clone();
        let attempts = (0..12).map(|index| {
            let (server, token) = (servers[index % 2].clone(), token.clone());
            async move { introspect_with(&server, introspection(&token, REPORTS, "")).await }
        });
        let answers = futures_util::future::join_all(attempts).await;
        let mut uses: Vec<u32> = answers
            .iter()
            .filter(|answer| answer.active)
            .map(|answer| answer.uses)
            .collect();
        uses.sort_unstable();
        assert_eq!(
            uses,
            [1, 2, 3],
            "round {round}: exactly three uses accepted"
        );
    }
    first.stop().await;
    second.stop().await;
}

/// Reports are read-only: a report token is used to read or list, never to delete.
const USE_POLICY: &str = r#"
@id("agents-request-scopes")
permit (principal in Warrant::Role::"agent", action == Warrant::Action::"RequestGrant", resource);

@id("agents-use-their-tokens")
permit (principal in Warrant::Role::"agent", action == Warrant::Action::"UseToken", resource);

@id("report-tokens-only-read")
forbid (principal, action == Warrant::Action::"UseToken", resource)
when { resource.labels.contains("access=read") && !(context.use_action like "*.read") };

@id("reports-not-for-interns")
forbid (principal, action == Warrant::Action::"UseToken", resource)
when { principal.name like "intern-*" && context.checked_by == "reports-api" };
"#;

const LABELLED_REPORTS: &str = r#"
[[scope]]
name = "reports:export"
audience = "https://reports.test"
kind = "jwt"
default_ttl = "5m"
max_ttl = "10m"
workloads = ["*"]
max_uses = 2
labels = { access = "read" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_decides_each_use_a_resource_server_names() {
    let data = TestData::new(Backend::Sqlite).await;
    std::fs::write(data.path().join("scopes.toml"), LABELLED_REPORTS).unwrap();
    let dir = data.path().join("policy");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("uses.cedar"), USE_POLICY).unwrap();
    let mut config = data.config();
    config.policy = PolicySource::Dir(dir);
    let app = TestApp::spawn_with(config).await;
    let server = app
        .connect(Some(&app.resource_server("reports-api", &[REPORTS]).await))
        .await;
    let task = app.begin_as("report-agent", &["reports:export"]).await;
    let token = &task.leases[0].credential;

    let refused = introspect(&server, token, REPORTS, "reports.delete").await;
    assert!(!refused.active, "a read-only token does not delete");
    assert!(
        refused.reason.contains("report-tokens-only-read"),
        "the reason names the policy: {}",
        refused.reason
    );
    let allowed = introspect(&server, token, REPORTS, "reports.read").await;
    assert!(allowed.active, "{}", allowed.reason);
    assert_eq!(allowed.uses, 1, "the refused use consumed none");
    // Without an action policy is not asked; the use still counts.
    let unnamed = introspect(&server, token, REPORTS, "").await;
    assert_eq!((unnamed.active, unnamed.uses), (true, 2));
    let spent = introspect(&server, token, REPORTS, "reports.read").await;
    assert!(
        !spent.active && spent.reason.contains("use limit"),
        "{}",
        spent.reason
    );

    // The holder is the principal: an intern's token is refused to this resource server.
    let intern = app.begin_as("intern-7", &["reports:export"]).await;
    let answer = introspect(
        &server,
        &intern.leases[0].credential,
        REPORTS,
        "reports.read",
    )
    .await;
    assert!(!answer.active);
    assert!(
        answer.reason.contains("reports-not-for-interns"),
        "{}",
        answer.reason
    );

    // A resource needs its action, and the message names the field.
    let status = server
        .tokens()
        .introspect(proto::IntrospectRequest {
            token: token.clone(),
            audience: REPORTS.into(),
            resource: "report/7".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("action"),
        "{}",
        status.message()
    );

    // Each decision is in the audit trail with the use it was about and its policies.
    let events = audit_events_of_type(&app.admin().await, "token.introspected").await;
    let denied = events
        .iter()
        .map(|event| serde_json::from_str::<serde_json::Value>(&event.detail_json).unwrap())
        .find(|detail| detail["use_action"] == "reports.delete")
        .expect("the refused use is audited");
    assert_eq!(denied["use_decision"], "denied");
    assert_eq!(denied["use_resource"], "report/7");
    assert_eq!(
        denied["policies"],
        serde_json::json!(["report-tokens-only-read"])
    );

    // The same decision over RFC 7662 HTTP, with its reason.
    let credential = app.resource_server("reports-http", &[REPORTS]).await;
    let fresh = app.begin_as("report-agent-2", &["reports:export"]).await;
    let form = format!(
        "token={}&action=reports.delete&resource=report%2F7",
        fresh.leases[0].credential
    );
    let (status, body) = http_introspect(app.http_addr, Some(&credential), &form);
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["active"], false);
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("report-tokens-only-read")
    );
    let form = format!("token={}&action=reports.read", fresh.leases[0].credential);
    let (_, body) = http_introspect(app.http_addr, Some(&credential), &form);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (body["active"].as_bool(), body["uses"].as_u64()),
        (Some(true), Some(1))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_without_use_rules_refuses_every_named_use() {
    // Deny by default: policy that says nothing of UseToken refuses a use it is asked about,
    // while introspection without an action is unchanged.
    let data = TestData::new(Backend::Sqlite).await;
    let dir = data.path().join("policy");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("grants.cedar"),
        r#"permit (principal, action == Warrant::Action::"RequestGrant", resource);"#,
    )
    .unwrap();
    let mut config = data.config();
    config.policy = PolicySource::Dir(dir);
    let app = TestApp::spawn_with(config).await;
    let admin = app.admin().await;
    let task = app.begin_as("crm-agent", &["crm.contacts:read"]).await;
    let token = &task.leases[0].credential;
    let refused = introspect(&admin, token, CRM, "contacts.read").await;
    assert!(!refused.active);
    assert!(
        refused.reason.contains("deny by default"),
        "{}",
        refused.reason
    );
    assert!(introspect(&admin, token, CRM, "").await.active);
    app.stop().await;
}
