//! Policy-as-code through the real server: Cedar decides each grant after the catalog, deny by
//! default; decisions name their policies in the audit trail; the caller's risk signal can turn
//! a free scope into one that needs approval; a reload swaps the set, and a broken set leaves the
//! one in force. The CLI's offline `policy check|test` and SIGHUP run the real binary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::Code;
use warrant::client::Connection;
use warrant::policy::PolicySource;
use warrant::proto;

use crate::process::BrokerProcess;
use crate::support::*;

/// The test catalog with the labels the policies read.
const LABELLED_CATALOG: &str = r#"
[[scope]]
name = "crm.contacts:read"
audience = "https://crm.test"
kind = "jwt"
default_ttl = "5m"
max_ttl = "10m"
workloads = ["*"]
labels = { access = "read" }

[[scope]]
name = "tickets:write"
audience = "https://tickets.test"
kind = "jwt"
default_ttl = "5m"
max_ttl = "10m"
workloads = ["*"]
labels = { access = "write" }

[[scope]]
name = "archive:purge"
audience = "https://archive.test"
kind = "jwt"
default_ttl = "1m"
max_ttl = "2m"
workloads = ["*"]
"#;

const POLICY: &str = r#"
@id("reads-are-free")
permit (principal in Warrant::Role::"agent", action == Warrant::Action::"RequestGrant", resource)
when { resource.labels.contains("access=read") };

@id("writes-are-allowed")
permit (principal in Warrant::Role::"agent", action == Warrant::Action::"RequestGrant", resource)
when { resource.labels.contains("access=write") };

@id("no-writes-for-interns")
forbid (principal, action, resource)
when { resource.labels.contains("access=write") && principal.name like "intern-*" };

@id("risky-requests-need-an-operator")
@approval
permit (principal, action, resource)
when { context has risk && context.risk >= 50 };
"#;

/// A broker on SQLite whose policy directory holds `policy` as `fleet.cedar`.
async fn broker_with_policy(policy: &str) -> (TestData, TestApp, PathBuf) {
    let data = TestData::new(Backend::Sqlite).await;
    std::fs::write(data.path().join("scopes.toml"), LABELLED_CATALOG).unwrap();
    let dir = data.path().join("policy");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("fleet.cedar"), policy).unwrap();
    let mut config = data.config();
    config.policy = PolicySource::Dir(dir.clone());
    let app = TestApp::spawn_with(config).await;
    (data, app, dir)
}

fn detail(event: &proto::AuditEvent) -> serde_json::Value {
    serde_json::from_str(&event.detail_json).unwrap()
}

async fn decisions(admin: &Connection) -> Vec<serde_json::Value> {
    audit_events_of_type(admin, "grant.decided")
        .await
        .iter()
        .map(|event| {
            let mut value = detail(event);
            value["outcome"] = event.outcome.clone().into();
            value["scope"] = event.scope.clone().into();
            value
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_decides_each_grant_and_the_audit_names_the_deciding_policies() {
    let (_data, app, _) = broker_with_policy(POLICY).await;
    let admin = app.admin().await;
    let agent = app.agent("support-agent").await;
    agent
        .tasks()
        .begin_task(begin(&["crm.contacts:read", "tickets:write"]))
        .await
        .expect("reads and writes are permitted");

    // A forbid wins over the permit, and the refusal names the field and the policy.
    let intern = app.agent("intern-bot").await;
    let refused = intern
        .tasks()
        .begin_task(begin(&["crm.contacts:read", "tickets:write"]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().starts_with("scopes[1]:")
            && refused.message().contains("no-writes-for-interns"),
        "{}",
        refused.message()
    );
    // No policy permits a scope without an access label: denied by default.
    let refused = agent
        .tasks()
        .begin_task(begin(&["archive:purge"]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("deny by default"),
        "{}",
        refused.message()
    );

    let decided = decisions(&admin).await;
    let of = |scope: &str, outcome: &str| {
        decided
            .iter()
            .find(|value| value["scope"] == scope && value["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {outcome} decision on {scope}: {decided:#?}"))
            .clone()
    };
    let read = of("crm.contacts:read", "allowed");
    assert_eq!(read["policies"], serde_json::json!(["reads-are-free"]));
    assert_eq!(read["policy_version"].as_str().unwrap().len(), 16);
    assert_eq!(
        of("tickets:write", "denied")["policies"],
        serde_json::json!(["no-writes-for-interns"])
    );
    let by_default = of("archive:purge", "denied");
    assert_eq!(by_default["policies"], serde_json::json!([]));
    assert_eq!(
        by_default["reason"],
        "no policy permits it (deny by default)"
    );
    // The intern's refused task was not opened: its allowed read was not issued either.
    let issued = audit_events_of_type(&admin, "lease.issued").await;
    assert!(
        issued.iter().all(|event| event.workload != "intern-bot"),
        "{issued:#?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_risk_signal_makes_a_free_scope_wait_for_an_operator() {
    let (_data, app, _) = broker_with_policy(POLICY).await;
    let agent = app.agent("support-agent").await;
    let task = agent
        .tasks()
        .begin_task(begin(&[]))
        .await
        .unwrap()
        .into_inner();
    let grant = |risk: Option<u32>| proto::RequestGrantRequest {
        risk,
        ..grant_request(&task.task_id, "crm.contacts:read", 0)
    };
    let free = agent
        .tasks()
        .request_grant(grant(Some(10)))
        .await
        .expect("a low risk signal changes nothing")
        .into_inner();
    assert!(free.lease.is_some() && free.pending.is_none());
    let stepped_up = agent
        .tasks()
        .request_grant(grant(Some(80)))
        .await
        .expect("a high signal makes the grant wait, it does not refuse it")
        .into_inner();
    assert!(stepped_up.lease.is_none(), "nothing issued before approval");
    let pending = stepped_up.pending.expect("the grant waits for an operator");
    assert_eq!(pending.state(), proto::GrantState::Pending);
    assert_eq!((pending.approvals, pending.quorum), (0, 1));
    let out_of_range = agent
        .tasks()
        .request_grant(grant(Some(101)))
        .await
        .unwrap_err();
    assert_eq!(out_of_range.code(), Code::InvalidArgument);
    assert!(
        out_of_range.message().starts_with("risk:"),
        "{}",
        out_of_range.message()
    );
    // A retried BeginTask hands out fresh credentials, so it is decided again with its own
    // signal: the same request with a risen signal gets nothing.
    let keyed = |risk: u32| proto::BeginTaskRequest {
        idempotency_key: "ticket-T-1".into(),
        risk: Some(risk),
        ..begin(&["crm.contacts:read"])
    };
    agent
        .tasks()
        .begin_task(keyed(5))
        .await
        .expect("first call");
    let retried = agent
        .tasks()
        .begin_task(keyed(5))
        .await
        .unwrap()
        .into_inner();
    assert!(retried.replayed && !retried.leases[0].credential.is_empty());
    let risen = agent.tasks().begin_task(keyed(90)).await.unwrap_err();
    assert_eq!(
        risen.code(),
        Code::FailedPrecondition,
        "{}",
        risen.message()
    );

    let decided = decisions(&app.admin().await).await;
    let step_up = decided
        .iter()
        .find(|value| value["outcome"] == "step_up")
        .expect("the step-up is audited");
    assert_eq!(step_up["risk"], 80);
    let metrics = http_get(app.http_addr, "/metrics").1;
    assert!(
        metrics.contains("warrant_policy_decisions_total{outcome=\"step_up\"} 2"),
        "{metrics}"
    );
    assert_eq!(
        step_up["approval_required"],
        "1 approval(s) from operators within 15m"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_replaces_the_set_and_a_broken_set_leaves_the_one_in_force() {
    let (_data, app, dir) = broker_with_policy(POLICY).await;
    let admin = app.admin().await;
    let agent = app.agent("support-agent").await;
    let begin_write = || {
        let mut tasks = agent.tasks();
        async move { tasks.begin_task(begin(&["tickets:write"])).await }
    };
    let opened = begin_write()
        .await
        .expect("writes are permitted at first")
        .into_inner();
    let lease_id = opened.leases[0].lease_id.clone();

    let frozen = format!(
        "{POLICY}\n@id(\"writes-frozen\")\nforbid (principal, action, resource) when {{ resource.labels.contains(\"access=write\") }};\n"
    );
    std::fs::write(dir.join("fleet.cedar"), &frozen).unwrap();
    let reloaded = admin
        .admin()
        .reload_policy(proto::ReloadPolicyRequest {})
        .await
        .expect("a valid set reloads")
        .into_inner();
    assert!(
        reloaded.policies.contains(&"writes-frozen".to_owned()),
        "{reloaded:?}"
    );
    assert_eq!(reloaded.approval_rules, ["risky-requests-need-an-operator"]);
    let refused = begin_write().await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("writes-frozen"),
        "{}",
        refused.message()
    );
    // A lease issued before the reload is not renewed past the new set either.
    let renewal = agent
        .tasks()
        .renew_lease(renew_request(&lease_id, 0))
        .await
        .unwrap_err();
    assert_eq!(renewal.code(), Code::PermissionDenied);
    assert!(
        renewal.message().starts_with("lease_id:") && renewal.message().contains("writes-frozen"),
        "{}",
        renewal.message()
    );

    // A set that does not validate is refused with the file and line, and the set in force (the
    // frozen one) still decides.
    std::fs::write(
        dir.join("fleet.cedar"),
        "permit (principal, action, resource)\nwhen { context.no_such_attribute == 1 };\n",
    )
    .unwrap();
    let broken = admin
        .admin()
        .reload_policy(proto::ReloadPolicyRequest {})
        .await
        .unwrap_err();
    assert_eq!(broken.code(), Code::FailedPrecondition);
    assert!(
        broken.message().contains("fleet.cedar:2:")
            && broken.message().contains("the set in force"),
        "{}",
        broken.message()
    );
    let still_refused = begin_write().await.unwrap_err();
    assert!(
        still_refused.message().contains("writes-frozen"),
        "{}",
        still_refused.message()
    );
    let reloads = audit_events_of_type(&admin, "policy.reloaded").await;
    let outcomes: Vec<&str> = reloads.iter().map(|event| event.outcome.as_str()).collect();
    assert_eq!(outcomes, ["ok", "refused"]);
    assert_eq!(
        detail(&reloads[0])["digest"].as_str().unwrap(),
        reloaded.digest
    );

    // An agent may not reload policy.
    let denied = agent
        .admin()
        .reload_policy(proto::ReloadPolicyRequest {})
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    app.stop().await;
}

/// `warrant policy test` on the example set in deploy/, at fixed hours so the night rule is
/// deterministic.
#[test]
fn the_example_policy_set_validates_and_answers_as_documented() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let policy = manifest.join("deploy/policy");
    let catalog = manifest.join("deploy/scopes.toml");
    let check = std::process::Command::new(warrant_binary())
        .args(["policy", "check"])
        .arg(&policy)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let answer = |args: &[&str]| {
        let output = std::process::Command::new(warrant_binary())
            .args(["--json", "policy", "test", "--dir"])
            .arg(&policy)
            .arg("--catalog")
            .arg(&catalog)
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let agent = ["--workload", "support-agent"];
    let read = [&agent[..], &["--scope", "crm.contacts:read"]].concat();
    assert_eq!(
        answer(&[&read[..], &["--hour", "10"]].concat())["decision"],
        "allow"
    );
    let night = answer(&[&read[..], &["--hour", "23"]].concat());
    assert_eq!(night["decision"], "step-up");
    assert_eq!(
        night["approval"]["rules"],
        serde_json::json!(["night-needs-an-operator"])
    );
    let risky = answer(&[&read[..], &["--hour", "10", "--risk", "70"]].concat());
    assert_eq!(risky["decision"], "step-up");
    let write = [&agent[..], &["--scope", "tickets:write", "--hour", "10"]].concat();
    let one = answer(&write);
    assert_eq!(one["approval"]["quorum"], 1);
    let long = answer(&[&write[..], &["--ttl", "12m"]].concat());
    assert_eq!(long["decision"], "deny");
    assert_eq!(
        long["policies"],
        serde_json::json!(["no-long-write-leases"])
    );
    let billing = [
        "--workload",
        "billing-agent",
        "--scope",
        "payments:refund",
        "--hour",
        "10",
    ];
    let finance = answer(&[&billing[..], &["--workload-label", "team=billing"]].concat());
    assert_eq!(finance["decision"], "step-up");
    assert_eq!(finance["approval"]["quorum"], 2);
    assert_eq!(
        finance["approval"]["approver_labels"],
        serde_json::json!(["team=finance"])
    );
    assert_eq!(answer(&billing)["decision"], "deny");

    // Uses of a token, as a resource server names them when it introspects.
    let read_use = |action: &str| {
        answer(
            &[
                &read[..],
                &["--hour", "10", "--use", action, "--on", "contact/42"],
            ]
            .concat(),
        )
    };
    assert_eq!(read_use("contacts.read")["decision"], "allow");
    let delete = read_use("contacts.delete");
    assert_eq!(delete["decision"], "deny");
    assert_eq!(
        delete["policies"],
        serde_json::json!(["read-tokens-only-read"])
    );
    assert_eq!(
        answer(&[&read[..], &["--hour", "23", "--use", "GET /contacts/42"]].concat())["decision"],
        "allow",
        "the night rule is for grants and calls, not for each use"
    );

    // Tool calls, decided on their arguments.
    let call = |workload: &[&str], tool: &str, arguments: &str| {
        let call = ["--call", tool, "--args", arguments, "--hour", "10"];
        answer(&[workload, &call[..]].concat())
    };
    let refund = |workload: &[&str], cents: u32| {
        let arguments = format!(r#"{{"order_id":"1042","amount_cents":{cents}}}"#);
        call(workload, "payments.refund", &arguments)
    };
    let billing = [
        "--workload",
        "billing-agent",
        "--workload-label",
        "team=billing",
    ];
    assert_eq!(refund(&billing, 5_000)["decision"], "allow");
    let large = refund(&billing, 250_000);
    assert_eq!(large["decision"], "step-up");
    assert_eq!(large["approval"]["quorum"], 2);
    assert_eq!(
        refund(&agent, 5_000)["policies"],
        serde_json::json!(["payments-only-for-billing"])
    );
    let mail = call(
        &agent,
        "email.send",
        r#"{"to":"x@attacker.test","subject":"s","body":"b"}"#,
    );
    assert_eq!(mail["decision"], "deny");
    assert_eq!(
        mail["policies"],
        serde_json::json!(["mail-stays-in-the-company"])
    );
}

/// `serve --dev` writes the schema and default policy on first start; SIGHUP reloads them, and a
/// broken file at start is refused with exit 64 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_dev_policy_and_a_broken_set_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(&["serve", "--dev"], dir.path());
    let (grpc, _) = broker.wait_until_serving();
    let policy_dir = dir.path().join("warrant-data/policy");
    assert!(policy_dir.join("schema.cedarschema").exists());
    let default = std::fs::read_to_string(policy_dir.join("policies.cedar")).unwrap();
    assert!(default.contains("agents-request-catalog-scopes"));
    let admin = Connection::open(
        &format!("http://{grpc}"),
        broker.admin_credential().as_deref(),
        None,
    )
    .await
    .unwrap();
    std::fs::write(
        policy_dir.join("policies.cedar"),
        format!("{default}\n@id(\"nothing-today\")\nforbid (principal, action, resource);\n"),
    )
    .unwrap();
    let hangup = std::process::Command::new("kill")
        .args(["-HUP", &broker.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hangup.success());
    let reloaded = eventually(Duration::from_secs(10), || async {
        audit_events_of_type(&admin, "policy.reloaded")
            .await
            .iter()
            .any(|event| {
                event.outcome == "ok"
                    && event.actor == "warrant/signal"
                    && event.detail_json.contains("nothing-today")
            })
    })
    .await;
    assert!(reloaded, "SIGHUP reloaded the policy:\n{}", broker.stderr());
    let (code, _) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .unwrap();
    assert_eq!(code, 0);

    std::fs::write(
        policy_dir.join("policies.cedar"),
        "permit (principal, action",
    )
    .unwrap();
    let output = std::process::Command::new(warrant_binary())
        .args(["serve", "--dev"])
        .current_dir(dir.path())
        .env("WARRANT_GRPC_ADDR", "127.0.0.1:0")
        .env("WARRANT_HTTP_ADDR", "127.0.0.1:0")
        .env_remove("WARRANT_DATA_DIR")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("policies.cedar:1:"), "{stderr}");
}
