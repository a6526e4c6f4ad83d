//! The per-tool-call decision as an OpenID AuthZEN 1.0 policy decision point, so a gateway
//! that speaks AuthZEN asks Warrant without a gRPC client.
//!
//! A request is authenticated with the agent's own Warrant credential (a gateway forwards the
//! agent's bearer, as it forwards any client token), and its subject must be that agent: one
//! workload cannot ask on behalf of another. The subject's, action's and resource's
//! `properties` are ignored: policy reads the attributes Warrant attested and stored, never
//! attributes a caller asserts. Each evaluation is exactly `Tasks.AuthorizeToolCall` (or
//! `Tasks.ListTools`): the same policy, audit, and call token; a stepped-up call answers
//! `false` with the pending approval in its context, for the agent to follow with
//! `Tasks.WatchGrant`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{described, error_response, status_of};
use crate::broker::tool_calls::ToolCallAsk;
use crate::broker::{Broker, GrantAnswer};
use crate::domain::task::parse_risk;
use crate::domain::{Caller, TaskId};
use crate::error::{Error, Result};
use crate::grpc::access::Rpc;
use crate::grpc::authorize_header;

pub const EVALUATION_PATH: &str = "/access/v1/evaluation";
pub const EVALUATIONS_PATH: &str = "/access/v1/evaluations";
pub const CONFIGURATION_PATH: &str = "/.well-known/authzen-configuration";
/// Evaluations in one batch at most: each may mint a call token, so a batch is bounded like
/// any other burst of calls.
pub const MAX_EVALUATIONS: usize = 64;
/// The largest request body taken: a full batch of tool calls with their arguments.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The subject type Warrant decides for: an attested workload.
const SUBJECT_TYPE: &str = "workload";
/// The resource type Warrant decides on: a catalog tool.
const RESOURCE_TYPE: &str = "tool";
/// The HTTP header a PEP may correlate its request with; it is echoed back.
const REQUEST_ID: &str = "x-request-id";

#[derive(Deserialize, Clone)]
pub struct Subject {
    #[serde(rename = "type")]
    kind: String,
    id: String,
}

#[derive(Deserialize, Clone)]
pub struct Action {
    name: String,
}

#[derive(Deserialize, Clone)]
pub struct Resource {
    #[serde(rename = "type")]
    kind: String,
    id: String,
}

/// The context Warrant reads: the task the call belongs to, the call's arguments and the
/// caller's risk signal. Other members are ignored.
#[derive(Deserialize, Clone, Default)]
pub struct EvaluationContext {
    task_id: Option<String>,
    arguments: Option<Value>,
    risk: Option<u32>,
}

/// One access evaluation request (AuthZEN 1.0 section 6).
#[derive(Deserialize)]
pub struct EvaluationRequest {
    subject: Option<Subject>,
    action: Option<Action>,
    resource: Option<Resource>,
    context: Option<EvaluationContext>,
}

/// A batch (AuthZEN 1.0 section 7): the top-level members are defaults that each item's own
/// members replace.
#[derive(Deserialize)]
pub struct EvaluationsRequest {
    #[serde(flatten)]
    defaults: EvaluationRequest,
    #[serde(default)]
    evaluations: Vec<EvaluationRequest>,
    options: Option<EvaluationsOptions>,
}

#[derive(Deserialize)]
pub struct EvaluationsOptions {
    evaluations_semantic: Option<Semantic>,
}

/// When a batch stops early.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Semantic {
    #[default]
    ExecuteAll,
    DenyOnFirstDeny,
    PermitOnFirstPermit,
}

/// The tool action an evaluation asks about.
enum ToolAction {
    Call,
    List,
}

/// What the metadata document announces.
pub async fn configuration(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    let issuer = &broker.settings().issuer;
    Json(json!({
        "policy_decision_point": issuer,
        "access_evaluation_endpoint": format!("{issuer}{EVALUATION_PATH}"),
        "access_evaluations_endpoint": format!("{issuer}{EVALUATIONS_PATH}"),
    }))
}

/// `POST /access/v1/evaluation`: one decision; a malformed request is an HTTP error.
pub async fn evaluation(
    State(broker): State<Arc<Broker>>,
    headers: HeaderMap,
    body: std::result::Result<Json<EvaluationRequest>, JsonRejection>,
) -> Response {
    let answer = async {
        let request = parsed(body)?;
        let caller = authenticate(&broker, &headers).await?;
        let _admitted = broker.admit(&caller)?;
        evaluate(&broker, &caller, &request, None).await
    };
    respond(&headers, answer.await)
}

/// `POST /access/v1/evaluations`: a batch, decided in order; an item's own malformed members
/// make that item `false` with the error in its context, not the batch an error.
pub async fn evaluations(
    State(broker): State<Arc<Broker>>,
    headers: HeaderMap,
    body: std::result::Result<Json<EvaluationsRequest>, JsonRejection>,
) -> Response {
    let answer = async {
        let request = parsed(body)?;
        let caller = authenticate(&broker, &headers).await?;
        let _admitted = broker.admit(&caller)?;
        if request.evaluations.is_empty() {
            // Without items, a batch is one evaluation of its top-level members.
            return evaluate(&broker, &caller, &request.defaults, None).await;
        }
        if request.evaluations.len() > MAX_EVALUATIONS {
            return Err(Error::invalid(
                "evaluations",
                format!("at most {MAX_EVALUATIONS} in one request"),
            ));
        }
        let semantic = request
            .options
            .and_then(|options| options.evaluations_semantic)
            .unwrap_or_default();
        let mut answers = Vec::with_capacity(request.evaluations.len());
        for (index, item) in request.evaluations.iter().enumerate() {
            let answer = evaluate(&broker, &caller, item, Some(&request.defaults))
                .await
                .unwrap_or_else(|error| item_error(index, &error));
            let decision = answer["decision"].as_bool() == Some(true);
            answers.push(answer);
            match semantic {
                Semantic::DenyOnFirstDeny if !decision => break,
                Semantic::PermitOnFirstPermit if decision => break,
                _ => {}
            }
        }
        Ok(json!({ "evaluations": answers }))
    };
    respond(&headers, answer.await)
}

/// The request body, or the JSON error naming where it went wrong.
fn parsed<T>(body: std::result::Result<Json<T>, JsonRejection>) -> Result<T> {
    body.map(|Json(request)| request)
        .map_err(|rejection| Error::invalid("body", rejection.body_text()))
}

/// One evaluation: `item`'s members (or the batch's `defaults`), decided for `caller`.
async fn evaluate(
    broker: &Broker,
    caller: &Caller,
    item: &EvaluationRequest,
    defaults: Option<&EvaluationRequest>,
) -> Result<Value> {
    let (subject, action, resource, context) = complete(item, defaults)?;
    decide(broker, caller, subject, action, resource, context).await
}

async fn authenticate(broker: &Broker, headers: &HeaderMap) -> Result<Caller> {
    let header = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or_default());
    authorize_header(broker, header, Rpc::AuthorizeToolCall).await
}

/// An item's members, each its own or the batch's default; all four are required, and the
/// errors name the member as an AuthZEN request spells it.
fn complete<'a>(
    item: &'a EvaluationRequest,
    defaults: Option<&'a EvaluationRequest>,
) -> Result<(&'a Subject, &'a Action, &'a Resource, &'a EvaluationContext)> {
    let subject = item
        .subject
        .as_ref()
        .or(defaults.and_then(|d| d.subject.as_ref()))
        .ok_or_else(|| Error::invalid("subject", "is required"))?;
    let action = item
        .action
        .as_ref()
        .or(defaults.and_then(|d| d.action.as_ref()))
        .ok_or_else(|| Error::invalid("action", "is required"))?;
    let resource = item
        .resource
        .as_ref()
        .or(defaults.and_then(|d| d.resource.as_ref()))
        .ok_or_else(|| Error::invalid("resource", "is required"))?;
    let context = item
        .context
        .as_ref()
        .or(defaults.and_then(|d| d.context.as_ref()))
        .ok_or_else(|| Error::invalid("context.task_id", "is required"))?;
    Ok((subject, action, resource, context))
}

/// One evaluation: checks that the subject is the caller and the names Warrant knows, then
/// decides as the gRPC call does.
async fn decide(
    broker: &Broker,
    caller: &Caller,
    subject: &Subject,
    action: &Action,
    resource: &Resource,
    context: &EvaluationContext,
) -> Result<Value> {
    if subject.kind != SUBJECT_TYPE {
        return Err(Error::invalid(
            "subject.type",
            format!("must be '{SUBJECT_TYPE}'"),
        ));
    }
    if subject.id != caller.name.as_str() && subject.id != caller.spiffe_id.as_str() {
        return Err(Error::PermissionDenied(
            "subject.id: a workload asks only for itself (its name or SPIFFE ID)".into(),
        ));
    }
    let action = match action.name.as_str() {
        "CallTool" => ToolAction::Call,
        "ListTools" => ToolAction::List,
        _ => {
            return Err(Error::invalid(
                "action.name",
                "must be 'CallTool' or 'ListTools'",
            ));
        }
    };
    if resource.kind != RESOURCE_TYPE {
        return Err(Error::invalid(
            "resource.type",
            format!("must be '{RESOURCE_TYPE}'"),
        ));
    }
    let task_id = context
        .task_id
        .as_deref()
        .ok_or_else(|| Error::invalid("context.task_id", "is required"))?;
    let task_id = TaskId::parse("context.task_id", task_id)?;
    let risk = parse_risk("context.risk", context.risk)?;
    let decided = match action {
        ToolAction::Call => {
            let arguments = match &context.arguments {
                None => "{}".to_owned(),
                Some(arguments) => arguments.to_string(),
            };
            let ask = ToolCallAsk {
                task_id,
                tool: resource.id.clone(),
                arguments_json: arguments,
                risk,
            };
            broker
                .authorize_tool_call(caller, ask)
                .await
                .map(call_decision)
        }
        ToolAction::List => broker.list_tools(caller, &task_id).await.map(|tools| {
            let listed = tools.iter().any(|tool| tool.name == resource.id);
            json!({ "decision": listed })
        }),
    };
    match decided.map_err(in_authzen_terms) {
        Ok(answer) => Ok(answer),
        // A refusal is a decision: the call may not be made.
        Err(
            error @ (Error::PermissionDenied(_)
            | Error::NotFound { .. }
            | Error::FailedPrecondition(_)),
        ) => Ok(json!({ "decision": false, "context": { "reason": error.to_string() } })),
        Err(error) => Err(error),
    }
}

/// An invalid field named as the AuthZEN request spells it, not as `AuthorizeToolCall` does.
fn in_authzen_terms(error: Error) -> Error {
    match error {
        Error::InvalidArgument { field, message } => {
            let field = if field == "tool" {
                "resource.id".to_owned()
            } else if let Some(rest) = field.strip_prefix("arguments_json") {
                format!("context.arguments{rest}")
            } else {
                field
            };
            Error::InvalidArgument { field, message }
        }
        other => other,
    }
}

/// An allowed call carries its call token; a stepped-up one is not allowed yet, and names the
/// approval it waits for.
fn call_decision(answer: crate::broker::tool_calls::ToolCallAnswer) -> Value {
    let digest = answer.binding.arguments_digest;
    match answer.grant {
        GrantAnswer::Issued(lease) => json!({
            "decision": true,
            "context": {
                "call_token": lease.credential.as_ref().map(|c| c.expose()),
                "lease_id": lease.record.id.as_str(),
                "expires_at": lease.record.window.expires_at.as_seconds(),
                "arguments_digest": digest,
            },
        }),
        GrantAnswer::Pending(request) => json!({
            "decision": false,
            "context": {
                "reason": "approval required",
                "pending_approval": {
                    "lease_id": request.id.as_str(),
                    "quorum": request.quorum,
                    "wait_until": request.wait_until.as_seconds(),
                },
                "arguments_digest": digest,
            },
        }),
    }
}

/// A batch item that could not be evaluated: not allowed, with the reason.
fn item_error(index: usize, error: &Error) -> Value {
    json!({
        "decision": false,
        "context": {
            "id": index.to_string(),
            "error": { "status": status_of(error).0.as_u16(), "message": described(error) },
        },
    })
}

/// The answer as JSON, never cached, with the PEP's request id echoed.
fn respond(headers: &HeaderMap, answer: Result<Value>) -> Response {
    let mut response = match answer {
        Ok(body) => ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response(),
        Err(error) => error_response(&error),
    };
    if let Some(id) = headers
        .get(REQUEST_ID)
        .and_then(|id| HeaderValue::from_bytes(id.as_bytes()).ok())
    {
        response.headers_mut().insert(REQUEST_ID, id);
    }
    response
}
