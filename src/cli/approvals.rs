//! `warrant approvals ...`: what an operator does with the grants that wait for approval.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{Value, json};

use super::output::{Format, text, time};
use super::{Cli, CommandError};
use crate::proto;

#[derive(Subcommand)]
pub enum ApprovalsCommand {
    /// List the grant requests waiting for approval, oldest first, with what they are for.
    List(Filter),
    /// Show the requests waiting now, then each new one the moment it arrives (until Ctrl-C).
    Watch(Filter),
    /// Approve a grant request; the approval that reaches its quorum issues the credential.
    Approve(Answer),
    /// Deny a grant request: one denial ends it.
    Deny(Answer),
}

#[derive(clap::Args)]
pub struct Filter {
    /// Only this workload's requests.
    #[arg(long, default_value = "")]
    workload: String,
    /// Only requests for this scope (a tool call's is `tool:<name>`).
    #[arg(long, default_value = "")]
    scope: String,
}

impl Filter {
    fn to_proto(&self) -> Option<proto::PendingFilter> {
        Some(proto::PendingFilter {
            workload: self.workload.clone(),
            scope: self.scope.clone(),
        })
    }
}

#[derive(clap::Args)]
pub struct Answer {
    /// The request's lease id, as `approvals list` shows it.
    lease_id: String,
    /// Why (recorded in the audit trail; shown to the agent on a denial).
    #[arg(long)]
    reason: String,
    /// The request digest you judged (as `approvals list` shows it): refused if the request is
    /// not that one.
    #[arg(long, default_value = "")]
    digest: String,
}

pub async fn run(
    cli: &Cli,
    command: &ApprovalsCommand,
    format: &Format,
) -> Result<ExitCode, CommandError> {
    cli.require_identity()?;
    let mut approvals = cli.connect().await?.approvals();
    match command {
        ApprovalsCommand::List(filter) => {
            let mut requests = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = approvals
                    .list_pending(proto::ListPendingRequest {
                        page_size: 0,
                        page_token,
                        filter: filter.to_proto(),
                    })
                    .await?
                    .into_inner();
                requests.extend(page.requests.iter().map(request_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            let value = json!({ "requests": requests });
            format.print(&value, |value| {
                let listed = value["requests"].as_array().cloned().unwrap_or_default();
                if listed.is_empty() {
                    return "no grant request waits for approval\n".to_owned();
                }
                listed.iter().map(request_text).collect()
            })?;
        }
        ApprovalsCommand::Watch(filter) => {
            let mut stream = approvals
                .watch_pending(proto::WatchPendingRequest {
                    filter: filter.to_proto(),
                })
                .await?
                .into_inner();
            while let Some(request) = stream.message().await? {
                format.print(&request_json(&request), request_text)?;
            }
        }
        ApprovalsCommand::Approve(answer) | ApprovalsCommand::Deny(answer) => {
            let request = proto::AnswerRequest {
                lease_id: answer.lease_id.clone(),
                reason: answer.reason.clone(),
                request_digest: answer.digest.clone(),
            };
            let response = match command {
                ApprovalsCommand::Approve(_) => approvals.approve(request).await?,
                _ => approvals.deny(request).await?,
            }
            .into_inner();
            let value = json!({
                "lease_id": answer.lease_id,
                "state": response.state().as_str_name(),
                "approvals": response.approvals,
                "quorum": response.quorum,
                "counted": response.counted,
            });
            format.print(&value, |value| {
                let counted = if response.counted {
                    ""
                } else {
                    " (you had answered already: counted once)"
                };
                format!(
                    "{} is {}: {} of {} approval(s){counted}\n",
                    text(value, "lease_id"),
                    response.state().as_str_name(),
                    response.approvals,
                    response.quorum
                )
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn request_json(request: &proto::PendingGrant) -> Value {
    json!({
        "lease_id": request.lease_id,
        "task_id": request.task_id,
        "workload": request.workload,
        "scope": request.scope,
        "ttl_seconds": request.ttl_seconds,
        "request_digest": request.request_digest,
        "detail": serde_json::from_str::<Value>(&request.detail_json).unwrap_or(Value::Null),
        "quorum": request.quorum,
        "approver_labels": request.approver_labels,
        "created_at": time(request.created_at.as_ref()),
        "wait_until": time(request.wait_until.as_ref()),
        "approvals": request.approvals.iter().map(|approval| json!({
            "approver": approval.approver,
            "verdict": approval.verdict,
            "reason": approval.reason,
            "decided_at": time(approval.decided_at.as_ref()),
        })).collect::<Vec<_>>(),
    })
}

fn request_text(request: &Value) -> String {
    let detail = &request["detail"];
    let approvals: Vec<String> = request["approvals"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|approval| {
            format!(
                "{} ({})",
                text(approval, "approver"),
                text(approval, "reason")
            )
        })
        .collect();
    // A tool call is shown with its arguments (sensitive values already redacted).
    let call = match &detail["tool_call"] {
        Value::Null => String::new(),
        call => format!(
            "\n  call       {} {}",
            text(call, "tool"),
            call["arguments"]
        ),
    };
    format!(
        "{}  {} asks for {}{call}\n  purpose    {}\n  tools      {}\n  risk       {}\n  needs      {} approval(s){}; so far: {}\n  rules      {}\n  decide by  {}\n  digest     {}\n",
        text(request, "lease_id"),
        text(request, "workload"),
        text(request, "scope"),
        text(detail, "purpose"),
        listed_or_none(&detail["planned_tools"]),
        if detail["risk"].is_null() {
            "none sent".to_owned()
        } else {
            detail["risk"].to_string()
        },
        request["quorum"],
        match request["approver_labels"].as_array() {
            Some(labels) if !labels.is_empty() =>
                format!(" from operators with {}", Value::from(labels.clone())),
            _ => String::new(),
        },
        if approvals.is_empty() {
            "none".to_owned()
        } else {
            approvals.join(", ")
        },
        listed_or_none(&detail["approval_rules"]),
        text(request, "wait_until"),
        text(request, "request_digest"),
    )
}

/// A JSON list of strings as `a, b`, or `none`.
fn listed_or_none(list: &Value) -> String {
    let items: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}
