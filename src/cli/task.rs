//! `warrant task ...`: what an agent does.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{Value, json};

use super::output::{Format, text, time};
use super::{Cli, CommandError, check_length, key_values, ttl_seconds};
use crate::domain::task::MAX_PURPOSE_BYTES;
use crate::proto;

#[derive(Subcommand)]
pub enum TaskCommand {
    /// Open a task and receive a credential for each scope.
    Begin {
        /// Why the task exists (recorded in the audit trail; at most 512 bytes).
        #[arg(long)]
        purpose: String,
        /// A scope to receive a credential for (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// The task's lifetime, e.g. 10m: every credential of the task ends by then.
        #[arg(long, default_value = "15m", allow_hyphen_values = true)]
        ttl: String,
        /// sha256:<hex> digest of the prompt behind the task.
        #[arg(long, default_value = "")]
        prompt_digest: String,
        /// A tool the agent plans to call (repeatable).
        #[arg(long = "tool")]
        tools: Vec<String>,
        /// A label KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Makes a retried command return the same task instead of opening another.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Your guardrail's risk signal for this request, 0 to 100, for policy to read.
        #[arg(long)]
        risk: Option<u32>,
    },
    /// Add a credential for one more scope to an active task.
    Grant {
        /// The task, as `task begin` printed it.
        task_id: String,
        /// The scope to receive a credential for, from the catalog.
        #[arg(long)]
        scope: String,
        /// Lifetime, e.g. 5m (default: the scope's).
        #[arg(long, allow_hyphen_values = true)]
        ttl: Option<String>,
        /// Your guardrail's risk signal for this request, 0 to 100, for policy to read.
        #[arg(long)]
        risk: Option<u32>,
        /// If the grant waits for approval, wait for it (as `task watch` does).
        #[arg(long)]
        wait: bool,
    },
    /// Have one tool call authorized: prints its single-use call token (give it to the tool's
    /// service with the call), the denial, or the pending approval.
    Call {
        /// The task, as `task begin` printed it.
        task_id: String,
        /// The tool, from the catalog's [[tool]] entries.
        #[arg(long)]
        tool: String,
        /// The call's arguments as a JSON object, e.g. '{"order_id":"A-1","amount_cents":500}'.
        #[arg(long = "args", default_value = "{}")]
        arguments: String,
        /// Your guardrail's risk signal for this call, 0 to 100, for policy to read.
        #[arg(long)]
        risk: Option<u32>,
        /// If the call waits for approval, wait for it (as `task watch` does).
        #[arg(long)]
        wait: bool,
    },
    /// List the tools this task may call, with their arguments.
    Tools {
        /// The task, as `task begin` printed it.
        task_id: String,
    },
    /// Wait for a grant that waits for operators' approval: prints the lease with its
    /// credential once approved; exits 1 if it is denied, expires or its task ends.
    Watch {
        /// The grant's lease id, as `task grant` printed it.
        lease_id: String,
    },
    /// Extend a lease and receive a fresh credential for it. The new expiry is now plus the
    /// TTL, never past the scope's max_ttl from first issuance or the task's deadline.
    Renew {
        /// The lease, as `task begin` or `task grant` printed it.
        lease_id: String,
        /// How long from now the lease should last, e.g. 10m (default: the scope's default TTL).
        #[arg(long, allow_hyphen_values = true)]
        ttl: Option<String>,
    },
    /// Complete a task: every credential it holds is revoked.
    Complete {
        /// The task, as `task begin` printed it.
        task_id: String,
    },
}

pub async fn run(
    cli: &Cli,
    command: &TaskCommand,
    format: &Format,
) -> Result<ExitCode, CommandError> {
    cli.require_identity()?;
    let mut tasks = cli.connect().await?.tasks();
    match command {
        TaskCommand::Begin {
            purpose,
            scopes,
            ttl,
            prompt_digest,
            tools,
            labels,
            idempotency_key,
            risk,
        } => {
            let labels = key_values("--label", labels)?.into_iter().collect();
            check_length("--purpose", purpose, MAX_PURPOSE_BYTES)?;
            let request = proto::BeginTaskRequest {
                purpose: purpose.clone(),
                scopes: scopes.clone(),
                ttl_seconds: ttl_seconds("--ttl", ttl)?,
                context: Some(proto::TaskContext {
                    prompt_digest: prompt_digest.clone(),
                    planned_tools: tools.clone(),
                    labels,
                }),
                idempotency_key: idempotency_key.clone(),
                risk: *risk,
            };
            let response = tasks.begin_task(request).await?.into_inner();
            let value = json!({
                "task_id": response.task_id,
                "deadline": time(response.deadline.as_ref()),
                "replayed": response.replayed,
                "leases": response.leases.iter().map(lease_json).collect::<Vec<_>>(),
                "pending": response.pending.iter().map(grant_json).collect::<Vec<_>>(),
            });
            format.print(&value, |value| {
                let mut out = format!(
                    "task      {}\ndeadline  {}\n",
                    text(value, "task_id"),
                    text(value, "deadline")
                );
                for lease in value["leases"].as_array().into_iter().flatten() {
                    out.push_str(&lease_text(lease));
                }
                for pending in &response.pending {
                    out.push_str(&pending_text(pending));
                }
                out
            })?;
        }
        TaskCommand::Grant {
            task_id,
            scope,
            ttl,
            risk,
            wait,
        } => {
            let ttl_seconds = optional_ttl_seconds(ttl.as_deref())?;
            let request = proto::RequestGrantRequest {
                task_id: task_id.clone(),
                scope: scope.clone(),
                ttl_seconds,
                risk: *risk,
            };
            let answer = tasks.request_grant(request).await?.into_inner();
            return print_grant_answer(&mut tasks, answer.lease, answer.pending, *wait, format)
                .await;
        }
        TaskCommand::Call {
            task_id,
            tool,
            arguments,
            risk,
            wait,
        } => {
            let request = proto::AuthorizeToolCallRequest {
                task_id: task_id.clone(),
                tool: tool.clone(),
                arguments_json: arguments.clone(),
                risk: *risk,
            };
            let answer = tasks.authorize_tool_call(request).await?.into_inner();
            eprintln!("arguments {}", answer.arguments_digest);
            return print_grant_answer(
                &mut tasks,
                answer.call_token,
                answer.pending,
                *wait,
                format,
            )
            .await;
        }
        TaskCommand::Tools { task_id } => {
            let tools = tasks
                .list_tools(proto::ListToolsRequest {
                    task_id: task_id.clone(),
                })
                .await?
                .into_inner()
                .tools;
            let value: Vec<Value> = tools.iter().map(tool_json).collect();
            format.print(&Value::Array(value), |_| {
                tools.iter().map(tool_text).collect::<String>()
            })?;
        }
        TaskCommand::Watch { lease_id } => {
            return watch_grant(&mut tasks, lease_id, format).await;
        }
        TaskCommand::Renew { lease_id, ttl } => {
            let ttl_seconds = optional_ttl_seconds(ttl.as_deref())?;
            let request = proto::RenewLeaseRequest {
                lease_id: lease_id.clone(),
                ttl_seconds,
            };
            let lease = tasks
                .renew_lease(request)
                .await?
                .into_inner()
                .lease
                .unwrap_or_default();
            format.print(&lease_json(&lease), lease_text)?;
        }
        TaskCommand::Complete { task_id } => {
            let response = tasks
                .complete_task(proto::CompleteTaskRequest {
                    task_id: task_id.clone(),
                })
                .await?
                .into_inner();
            let value = json!({
                "task_id": response.task_id,
                "state": response.state().as_str_name(),
                "revoked_lease_ids": response.revoked_lease_ids,
                "ended_at": time(response.ended_at.as_ref()),
                "already_completed": response.already_completed,
            });
            format.print(&value, |value| {
                if value["already_completed"] == true {
                    return format!(
                        "task {} was already completed; nothing more to revoke\n",
                        text(value, "task_id")
                    );
                }
                let revoked = value["revoked_lease_ids"].as_array().map_or(0, Vec::len);
                let mut out = format!(
                    "task {} completed; revoked {revoked} lease(s)\n",
                    text(value, "task_id")
                );
                for id in value["revoked_lease_ids"].as_array().into_iter().flatten() {
                    out.push_str(&format!("  revoked {}\n", id.as_str().unwrap_or_default()));
                }
                out
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Follows `WatchGrant` to its end: the lease once issued (exit 0), else the reason (exit 1).
async fn watch_grant(
    tasks: &mut crate::proto::tasks_client::TasksClient<crate::client::Authenticated>,
    lease_id: &str,
    format: &Format,
) -> Result<ExitCode, CommandError> {
    let mut stream = tasks
        .watch_grant(proto::WatchGrantRequest {
            lease_id: lease_id.to_owned(),
        })
        .await?
        .into_inner();
    while let Some(status) = stream.message().await? {
        match status.state() {
            proto::GrantState::Pending => {
                eprintln!(
                    "waiting: {} of {} approval(s)",
                    status.approvals, status.quorum
                );
            }
            proto::GrantState::Issued => {
                let lease = status.lease.unwrap_or_default();
                if lease.credential.is_empty() {
                    eprintln!(
                        "grant {lease_id} was issued, but its lease has ended ({})",
                        lease.state().as_str_name()
                    );
                    return Ok(ExitCode::FAILURE);
                }
                format.print(&lease_json(&lease), lease_text)?;
                return Ok(ExitCode::SUCCESS);
            }
            state => {
                eprintln!(
                    "grant {lease_id} {}: {}",
                    grant_state_name(state),
                    status.reason
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Err(CommandError::Rpc(tonic::Status::unavailable(
        "the broker ended the stream before the grant was decided; run `warrant task watch` again",
    )))
}

/// Prints a lease issued at once, or a pending grant (waiting for its answer if `wait`).
async fn print_grant_answer(
    tasks: &mut crate::proto::tasks_client::TasksClient<crate::client::Authenticated>,
    lease: Option<proto::Lease>,
    pending: Option<proto::GrantStatus>,
    wait: bool,
    format: &Format,
) -> Result<ExitCode, CommandError> {
    match (lease, pending) {
        (Some(lease), _) => format.print(&lease_json(&lease), lease_text)?,
        (None, Some(pending)) if wait => {
            eprint!("{}", pending_text(&pending));
            return watch_grant(tasks, &pending.lease_id, format).await;
        }
        (None, Some(pending)) => format.print(&grant_json(&pending), |_| pending_text(&pending))?,
        (None, None) => {
            return Err(CommandError::Usage(
                "the broker answered neither a lease nor a pending grant".into(),
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn tool_json(tool: &proto::Tool) -> Value {
    json!({
        "name": tool.name,
        "description": tool.description,
        "audience": tool.audience,
        "arguments": tool.arguments.iter().map(|argument| json!({
            "name": argument.name,
            "type": argument.r#type,
            "required": argument.required,
            "sensitive": argument.sensitive,
        })).collect::<Vec<_>>(),
    })
}

fn tool_text(tool: &proto::Tool) -> String {
    let arguments: Vec<String> = tool
        .arguments
        .iter()
        .map(|argument| {
            let mut shown = format!("{}: {}", argument.name, argument.r#type);
            if !argument.required {
                shown.push_str(" (optional)");
            }
            if argument.sensitive {
                shown.push_str(" (sensitive)");
            }
            shown
        })
        .collect();
    format!(
        "{}  {}\n  audience   {}\n  arguments  {}\n",
        tool.name,
        tool.description,
        tool.audience,
        arguments.join(", ")
    )
}

fn grant_state_name(state: proto::GrantState) -> &'static str {
    match state {
        proto::GrantState::Pending => "pending",
        proto::GrantState::Issued => "issued",
        proto::GrantState::Denied => "denied",
        proto::GrantState::Expired => "expired",
        proto::GrantState::Cancelled => "cancelled",
        proto::GrantState::Unspecified => "unknown",
    }
}

fn grant_json(status: &proto::GrantStatus) -> Value {
    json!({
        "lease_id": status.lease_id,
        "scope": status.scope,
        "state": grant_state_name(status.state()),
        "approvals": status.approvals,
        "quorum": status.quorum,
        "wait_until": time(status.wait_until.as_ref()),
    })
}

fn pending_text(status: &proto::GrantStatus) -> String {
    format!(
        "pending   {}
  scope      {}
  needs      {} approval(s), {} so far
  decide by  {}
",
        status.lease_id,
        status.scope,
        status.quorum,
        status.approvals,
        time(status.wait_until.as_ref())
    )
}

/// `--ttl` when given, else 0 (the scope's default).
fn optional_ttl_seconds(ttl: Option<&str>) -> Result<u32, CommandError> {
    ttl.map_or(Ok(0), |ttl| ttl_seconds("--ttl", ttl))
}

fn lease_json(lease: &proto::Lease) -> Value {
    json!({
        "lease_id": lease.lease_id,
        "scope": lease.scope,
        "kind": lease.kind().as_str_name(),
        "state": lease.state().as_str_name(),
        "audience": lease.audience,
        "issued_at": time(lease.issued_at.as_ref()),
        "expires_at": time(lease.expires_at.as_ref()),
        "credential": lease.credential,
    })
}

fn lease_text(lease: &Value) -> String {
    format!(
        "lease     {}\n  scope      {}\n  audience   {}\n  expires    {}\n  credential {}\n",
        text(lease, "lease_id"),
        text(lease, "scope"),
        text(lease, "audience"),
        text(lease, "expires_at"),
        text(lease, "credential"),
    )
}
