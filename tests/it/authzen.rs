//! The AuthZEN 1.0 evaluation endpoints through the real server: the same decisions as
//! `Tasks.AuthorizeToolCall` under the default policy (allow with a call token, deny on an
//! argument, step-up on an amount), batches with their three semantics, and the refusals: no
//! credential, a subject that is not the caller, malformed members named.

use serde_json::{Value, json};
use tonic::Code;
use warrant::proto;

use crate::support::*;

const PAYMENTS: &str = "https://payments.test";
const EVALUATION: &str = "/access/v1/evaluation";
const EVALUATIONS: &str = "/access/v1/evaluations";

fn refund(cents: u32) -> Value {
    json!({ "order_id": "A-1", "amount_cents": cents })
}

/// One evaluation by `agent` of `action` on `tool` in `task_id`.
fn ask(agent: &str, action: &str, tool: &str, task_id: &str, arguments: Value) -> Value {
    json!({
        "subject": { "type": "workload", "id": agent },
        "action": { "name": action },
        "resource": { "type": "tool", "id": tool },
        "context": { "task_id": task_id, "arguments": arguments },
    })
}

/// The gRPC answer to the same call, for comparison.
async fn grpc_call(
    agent: &warrant::client::Connection,
    task_id: &str,
    tool: &str,
    arguments: &Value,
) -> Result<proto::AuthorizeToolCallResponse, tonic::Status> {
    agent
        .tasks()
        .authorize_tool_call(tool_call(task_id, tool, &arguments.to_string()))
        .await
        .map(|response| response.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authzen_answers_what_authorize_tool_call_answers() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let credential = app.workload("billing-agent", &[proto::Role::Agent]).await;
    let agent = app.connect(Some(&credential)).await;
    let task_id = open_task(&agent).await;

    let configuration = app.http("/.well-known/authzen-configuration");
    assert_eq!(configuration["policy_decision_point"], app.issuer.as_str());
    assert_eq!(
        configuration["access_evaluation_endpoint"],
        format!("{}{EVALUATION}", app.issuer)
    );
    assert_eq!(
        configuration["access_evaluations_endpoint"],
        format!("{}{EVALUATIONS}", app.issuer)
    );

    // Allowed: a call token for the call, bound to the same digest the gRPC call reports.
    let small = refund(500);
    let (status, allowed) = http_post_json(
        app.http_addr,
        EVALUATION,
        Some(&credential),
        &ask(
            "billing-agent",
            "CallTool",
            "payments.refund",
            &task_id,
            small.clone(),
        ),
    );
    assert_eq!(status, 200, "{allowed}");
    assert_eq!(allowed["decision"], true, "{allowed}");
    let grpc = grpc_call(&agent, &task_id, "payments.refund", &small)
        .await
        .unwrap();
    assert!(grpc.call_token.is_some());
    assert_eq!(
        allowed["context"]["arguments_digest"],
        grpc.arguments_digest
    );
    let token = allowed["context"]["call_token"].as_str().unwrap();
    assert!(app.is_active(token, PAYMENTS).await);
    assert!(
        !app.is_active(token, PAYMENTS).await,
        "a call token from AuthZEN is single-use too"
    );

    // Denied on an argument, with the policy's reason; gRPC refuses the same call.
    let outside = json!({ "to": "x@attacker.test" });
    let (status, denied) = http_post_json(
        app.http_addr,
        EVALUATION,
        Some(&credential),
        &ask(
            "billing-agent",
            "CallTool",
            "email.send",
            &task_id,
            outside.clone(),
        ),
    );
    assert_eq!(status, 200, "{denied}");
    assert_eq!(denied["decision"], false);
    let reason = denied["context"]["reason"].as_str().unwrap();
    assert!(reason.contains("mail-stays-in-the-company"), "{reason}");
    let refused = grpc_call(&agent, &task_id, "email.send", &outside)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Stepped up: not allowed yet, and the pending approval is there for operators.
    let (status, stepped_up) = http_post_json(
        app.http_addr,
        EVALUATION,
        Some(&credential),
        &ask(
            "billing-agent",
            "CallTool",
            "payments.refund",
            &task_id,
            refund(25_000),
        ),
    );
    assert_eq!(status, 200, "{stepped_up}");
    assert_eq!(stepped_up["decision"], false);
    let pending = stepped_up["context"]["pending_approval"]["lease_id"]
        .as_str()
        .expect("the pending approval is named");
    let grpc = grpc_call(&agent, &task_id, "payments.refund", &refund(25_000))
        .await
        .unwrap();
    assert!(grpc.pending.is_some(), "gRPC steps up the same call");
    let operator = app.workload("alice", &[proto::Role::Operator]).await;
    let waiting = pending_requests(&app.connect(Some(&operator)).await).await;
    assert!(waiting.iter().any(|request| request.lease_id == pending));

    // Listing is its own action.
    let (_, listed) = http_post_json(
        app.http_addr,
        EVALUATION,
        Some(&credential),
        &ask(
            "billing-agent",
            "ListTools",
            "email.send",
            &task_id,
            json!({}),
        ),
    );
    assert_eq!(listed["decision"], true, "{listed}");

    // Every AuthZEN decision is audited like a gRPC one: three calls each way.
    let decided = audit_events_of_type(&app.admin().await, "tool.decided").await;
    assert_eq!(decided.len(), 6);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authzen_batches_follow_their_semantics() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let credential = app.workload("billing-agent", &[proto::Role::Agent]).await;
    let agent = app.connect(Some(&credential)).await;
    let task_id = open_task(&agent).await;
    let batch = |semantic: &str| {
        json!({
            "subject": { "type": "workload", "id": "billing-agent" },
            "action": { "name": "CallTool" },
            "context": { "task_id": task_id },
            "evaluations": [
                { "resource": { "type": "tool", "id": "email.send" },
                  "context": { "task_id": task_id, "arguments": { "to": "x@attacker.test" } } },
                { "resource": { "type": "tool", "id": "payments.refund" },
                  "context": { "task_id": task_id, "arguments": refund(100) } },
                { "action": { "name": "ListTools" },
                  "resource": { "type": "tool", "id": "email.send" } },
                { "action": { "name": "Delete" },
                  "resource": { "type": "tool", "id": "email.send" } },
            ],
            "options": { "evaluations_semantic": semantic },
        })
    };
    let decisions = |body: &Value| -> Vec<bool> {
        body["evaluations"]
            .as_array()
            .unwrap_or_else(|| panic!("no evaluations: {body}"))
            .iter()
            .map(|answer| answer["decision"].as_bool().unwrap())
            .collect()
    };
    let (status, all) = http_post_json(
        app.http_addr,
        EVALUATIONS,
        Some(&credential),
        &batch("execute_all"),
    );
    assert_eq!(status, 200, "{all}");
    assert_eq!(decisions(&all), [false, true, true, false]);
    assert!(all["evaluations"][1]["context"]["call_token"].is_string());
    let malformed = &all["evaluations"][3]["context"]["error"];
    assert_eq!(malformed["status"], 400);
    assert!(
        malformed["message"]
            .as_str()
            .unwrap()
            .starts_with("action.name:"),
        "{malformed}"
    );

    let (_, first_deny) = http_post_json(
        app.http_addr,
        EVALUATIONS,
        Some(&credential),
        &batch("deny_on_first_deny"),
    );
    assert_eq!(decisions(&first_deny), [false]);
    let (_, first_permit) = http_post_json(
        app.http_addr,
        EVALUATIONS,
        Some(&credential),
        &batch("permit_on_first_permit"),
    );
    assert_eq!(decisions(&first_permit), [false, true]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authzen_refuses_strangers_impersonation_and_malformed_requests() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let credential = app.workload("billing-agent", &[proto::Role::Agent]).await;
    let agent = app.connect(Some(&credential)).await;
    let task_id = open_task(&agent).await;
    let other = app.workload("other-agent", &[proto::Role::Agent]).await;
    let call = ask(
        "billing-agent",
        "CallTool",
        "payments.refund",
        &task_id,
        refund(1),
    );

    let (status, _) = http_post_json(app.http_addr, EVALUATION, None, &call);
    assert_eq!(status, 401, "no credential, no decision");
    let (status, _) = http_post_json(app.http_addr, EVALUATION, Some("wrt_forged"), &call);
    assert_eq!(status, 401, "a forged credential is refused");
    let (status, body) = http_post_json(app.http_addr, EVALUATION, Some(&other), &call);
    assert_eq!(status, 403, "a workload asks only for itself: {body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("subject.id:")
    );
    // Asking for itself about another workload's task: not found, so not allowed.
    let foreign = ask(
        "other-agent",
        "CallTool",
        "payments.refund",
        &task_id,
        refund(1),
    );
    let (status, body) = http_post_json(app.http_addr, EVALUATION, Some(&other), &foreign);
    assert_eq!((status, &body["decision"]), (200, &json!(false)), "{body}");

    let spiffe_id = "spiffe://test.local/workload/billing-agent";
    let by_spiffe_id = ask(
        spiffe_id,
        "CallTool",
        "payments.refund",
        &task_id,
        refund(1),
    );
    let (status, body) =
        http_post_json(app.http_addr, EVALUATION, Some(&credential), &by_spiffe_id);
    assert_eq!((status, &body["decision"]), (200, &json!(true)), "{body}");

    let mut wrong_type = call.clone();
    wrong_type["resource"]["type"] = json!("document");
    let mut no_task = call.clone();
    no_task["context"] = json!({ "arguments": refund(1) });
    let mut bad_argument = call.clone();
    bad_argument["context"]["arguments"]["amount_cents"] = json!("lots");
    let mut unknown_tool = call.clone();
    unknown_tool["resource"]["id"] = json!("shell.exec");
    let mut no_subject = call.clone();
    no_subject.as_object_mut().unwrap().remove("subject");
    for (request, field) in [
        (wrong_type, "resource.type:"),
        (no_task, "context.task_id:"),
        (bad_argument, "context.arguments.amount_cents:"),
        (unknown_tool, "resource.id:"),
        (no_subject, "subject:"),
    ] {
        let (status, body) = http_post_json(app.http_addr, EVALUATION, Some(&credential), &request);
        assert_eq!(status, 400, "{body}");
        let description = body["error_description"].as_str().unwrap();
        assert!(description.starts_with(field), "{field} {description}");
    }
    let too_many: Vec<Value> = (0..65).map(|_| json!({})).collect();
    let (status, body) = http_post_json(
        app.http_addr,
        EVALUATIONS,
        Some(&credential),
        &json!({ "subject": call["subject"], "evaluations": too_many }),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        count_rows(&data, "leases").await,
        1,
        "only the call by SPIFFE ID was issued"
    );
    app.stop().await;
}
