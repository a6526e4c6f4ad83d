//! Per-tool-call authorization: one call of a catalog tool, with its arguments, decided by
//! policy with the task's current state. An allowed call gets a call token: a lease of the
//! tool's call scope (`tool:<name>`, a minute by default) whose token is bound to the tool and
//! the arguments' digest and is accepted by introspection once. A stepped-up call waits for
//! operators like a grant, bound to that exact call.

use super::approvals::{HeldCall, HeldGrant};
use super::grant_decision::{CATALOG_POLICY, PolicyAnswer, Refused};
use super::{Broker, GrantAnswer, issued_lease_record, task_not_active};
use crate::audit::AuditEvent;
use crate::domain::tool::{CallBinding, CheckedArguments};
use crate::domain::{Caller, TaskId, ToolDefinition, UnixMillis};
use crate::error::Result;
use crate::policy::{Decision, TaskFacts, ToolAction, ToolQuery};
use crate::store::NewLeaseOutcome;

/// One tool call to decide.
pub struct ToolCallAsk {
    pub task_id: TaskId,
    pub tool: String,
    /// A JSON object, checked against the tool's declared arguments.
    pub arguments_json: String,
    pub risk: Option<u32>,
}

/// The answer to an allowed or stepped-up call.
pub struct ToolCallAnswer {
    pub grant: GrantAnswer,
    pub binding: CallBinding,
}

impl Broker {
    /// Decides one tool call: the catalog (is the tool defined, may this workload call it),
    /// the declared arguments, then policy. A deny is the error; every decision is audited with
    /// the arguments' digest and the arguments with sensitive values redacted.
    pub async fn authorize_tool_call(
        &self,
        caller: &Caller,
        ask: ToolCallAsk,
    ) -> Result<ToolCallAnswer> {
        let tool = match self.catalog.authorize_tool(caller, &ask.tool) {
            Ok(tool) => tool,
            Err(error) => return Err(self.refused_by_catalog(caller, &ask, error).await),
        };
        let arguments = tool.check_arguments(&ask.arguments_json)?;
        let now = UnixMillis::now();
        let task = self.active_task(caller, &ask.task_id, now).await?;
        let policy = self.policy.current();
        let facts = TaskFacts {
            purpose: &task.purpose,
            context: &task.context,
            requested_ttl: tool.call_scope.default_ttl,
            delegation_depth: 0,
            now,
            risk: ask.risk,
        };
        let decision = policy.decide_tool(&ToolQuery {
            caller,
            tool,
            action: ToolAction::Call,
            arguments: Some(&arguments),
            facts,
        });
        let binding = CallBinding {
            tool: tool.name.clone(),
            arguments_digest: arguments.digest.clone(),
        };
        let context_json = task.context.to_json();
        let event =
            call_event("tool.decided", caller, &task.id, tool, &arguments).context(&context_json);
        let answer = self.policy_answer(decision, event, &policy.summary, ask.risk, |reason| {
            format!("tool: policy denies this call of '{}': {reason}", tool.name)
        });
        let scope = &tool.call_scope;
        let decision_event = match answer {
            Ok(PolicyAnswer::Allow(event)) => event,
            Ok(PolicyAnswer::StepUp(event, requirement)) => {
                let held = HeldGrant {
                    task: &task,
                    scope: &scope.name,
                    ttl_seconds: ttl_seconds(tool),
                    risk: ask.risk,
                    requirement,
                    call: Some(HeldCall {
                        binding: binding.clone(),
                        shown: &arguments.shown,
                    }),
                };
                let pending = self.hold_for_approval(caller, held, event, now).await?;
                return Ok(ToolCallAnswer {
                    grant: GrantAnswer::Pending(pending),
                    binding,
                });
            }
            Err(refused) => {
                let Refused { error, event } = *refused;
                self.store.record_events(vec![event]).await?;
                return Err(error);
            }
        };
        let key = self.keyring.current();
        let record = issued_lease_record(
            crate::domain::LeaseId::generate(now),
            &task,
            scope,
            None,
            now,
            &key,
        );
        let lease = super::IssuedLease {
            credential: Some(self.mint(caller, &record, &key, Some(&binding))),
            record,
        };
        let issued = self
            .issuance_event(caller, "lease.issued", &lease)
            .with("tool", tool.name.as_str())
            .with("arguments_digest", arguments.digest.as_str());
        match self
            .timed(
                "add_lease",
                self.store.add_lease(
                    &caller.workload_id,
                    lease.record.clone(),
                    now,
                    vec![decision_event, issued],
                ),
            )
            .await?
        {
            NewLeaseOutcome::Added => {
                self.count_issued(&lease);
                Ok(ToolCallAnswer {
                    grant: GrantAnswer::Issued(lease),
                    binding,
                })
            }
            NewLeaseOutcome::TaskNotActive => Err(task_not_active(&task.id)),
        }
    }

    /// A call the catalog refuses: a tool it lists for other workloads is a decision, audited
    /// like policy's; an unknown one is bad input, only answered.
    async fn refused_by_catalog(
        &self,
        caller: &Caller,
        ask: &ToolCallAsk,
        error: crate::error::Error,
    ) -> crate::error::Error {
        if let (crate::error::Error::PermissionDenied(_), Some(tool)) =
            (&error, self.catalog.tool(&ask.tool))
        {
            let event = AuditEvent::new("tool.decided", "denied", caller.name.as_str())
                .workload(&caller.name)
                .task(&ask.task_id)
                .scope(&tool.call_scope.name)
                .with("tool", tool.name.as_str())
                .with("policies", vec![CATALOG_POLICY])
                .with("reason", error.to_string());
            if let Err(failed) = self.store.record_events(vec![event]).await {
                return failed;
            }
        }
        error
    }

    /// The catalog's tools that `caller` may call and policy lets it see (`ListTools`) in
    /// task `task_id`.
    pub async fn list_tools(
        &self,
        caller: &Caller,
        task_id: &TaskId,
    ) -> Result<Vec<ToolDefinition>> {
        let now = UnixMillis::now();
        let task = self.active_task(caller, task_id, now).await?;
        let policy = self.policy.current();
        let listed = self
            .catalog
            .tools()
            .filter(|tool| self.catalog.authorize_tool(caller, &tool.name).is_ok())
            .filter(|tool| {
                let decision = policy.decide_tool(&ToolQuery {
                    caller,
                    tool,
                    action: ToolAction::List,
                    arguments: None,
                    facts: TaskFacts {
                        purpose: &task.purpose,
                        context: &task.context,
                        requested_ttl: tool.call_scope.default_ttl,
                        delegation_depth: 0,
                        now,
                        risk: None,
                    },
                });
                !matches!(decision, Decision::Deny { .. })
            })
            .cloned()
            .collect();
        Ok(listed)
    }
}

/// The call token's lifetime in whole seconds.
fn ttl_seconds(tool: &ToolDefinition) -> u32 {
    u32::try_from(tool.call_scope.default_ttl.as_secs()).unwrap_or(u32::MAX)
}

/// An audit event about one call: the tool, the arguments' digest and the arguments as they
/// may be shown (sensitive values redacted).
fn call_event(
    event_type: &'static str,
    caller: &Caller,
    task_id: &TaskId,
    tool: &ToolDefinition,
    arguments: &CheckedArguments,
) -> AuditEvent {
    AuditEvent::new(event_type, "pending", caller.name.as_str())
        .workload(&caller.name)
        .task(task_id)
        .scope(&tool.call_scope.name)
        .with("tool", tool.name.as_str())
        .with("arguments_digest", arguments.digest.as_str())
        .with("arguments", arguments.shown.clone())
}
