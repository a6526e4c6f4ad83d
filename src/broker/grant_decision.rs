//! Deciding one grant request: the scope catalog first (is the scope defined, may this workload
//! ask for it), then the policy set with the request's full context. Each decision becomes an
//! audit event naming the policies that decided it and the version of the set.

use std::time::Duration;

use super::Broker;
use crate::audit::AuditEvent;
use crate::domain::{Caller, ScopeDefinition, ScopeName, TaskContext, TaskId, UnixMillis};
use crate::error::Error;
use crate::metrics::DecisionLabels;
use crate::policy::{ApprovalRequirement, Decision, GrantQuery, PolicySummary, TaskFacts};

/// The policy that the catalog's own check is recorded as.
pub(super) const CATALOG_POLICY: &str = "scope-catalog";

/// A refused grant request: what the caller is told, and the audit event of the decision.
pub struct Refused {
    pub error: Error,
    pub event: AuditEvent,
}

/// What policy reads of a grant request besides the caller and the scope.
pub struct GrantAsk<'a> {
    /// The request field that named the scope, for error messages.
    pub field: &'a str,
    pub task_id: &'a TaskId,
    pub purpose: &'a str,
    pub context: &'a TaskContext,
    /// The lease lifetime asked for; `None` for the scope's default.
    pub ttl: Option<Duration>,
    pub risk: Option<u32>,
    pub now: UnixMillis,
}

impl Broker {
    /// The catalog's answer for `scope`, and its audit event when it refuses.
    pub(super) fn catalog_check(
        &self,
        caller: &Caller,
        task_id: &TaskId,
        field: &str,
        scope: &ScopeName,
    ) -> std::result::Result<&ScopeDefinition, Box<Refused>> {
        self.catalog
            .authorize(caller, field, scope)
            .map_err(|error| {
                let event = decided(caller, task_id, scope, "denied")
                    .with("policies", vec![CATALOG_POLICY])
                    .with("reason", error.to_string());
                Box::new(Refused { error, event })
            })
    }

    /// Policy's answer for a scope the catalog allows, with its audit event; a deny is the
    /// refusal the caller is told.
    pub(super) fn policy_check(
        &self,
        caller: &Caller,
        definition: &ScopeDefinition,
        ask: &GrantAsk<'_>,
    ) -> std::result::Result<PolicyAnswer, Box<Refused>> {
        let policy = self.policy.current();
        let decision = policy.decide(&GrantQuery {
            caller,
            scope: definition,
            facts: TaskFacts {
                purpose: ask.purpose,
                context: ask.context,
                requested_ttl: ask.ttl.unwrap_or(definition.default_ttl),
                delegation_depth: 0,
                now: ask.now,
                risk: ask.risk,
            },
        });
        let scope = &definition.name;
        let field = ask.field;
        self.policy_answer(
            decision,
            decided(caller, ask.task_id, scope, "pending"),
            &policy.summary,
            ask.risk,
            |reason| format!("{field}: policy denies scope '{scope}': {reason}"),
        )
    }

    /// Counts one policy decision, whatever the action, by its outcome.
    pub(super) fn count_decision(&self, decision: &Decision) {
        self.metrics
            .policy_decisions
            .get_or_create(&DecisionLabels {
                outcome: decision.outcome(),
            })
            .inc();
    }

    /// Counts `decision` and completes its audit `event` (the deciding policies, the set's
    /// version, the risk signal when sent, the reason): the answer, or the refusal whose
    /// message `denial` writes from the policy's reason.
    pub(super) fn policy_answer(
        &self,
        decision: Decision,
        event: AuditEvent,
        policy: &PolicySummary,
        risk: Option<u32>,
        denial: impl FnOnce(&str) -> String,
    ) -> std::result::Result<PolicyAnswer, Box<Refused>> {
        self.count_decision(&decision);
        let mut event = event
            .with("policies", decision.policies())
            .with("policy_version", policy.version());
        event.outcome = decision.outcome();
        // Recorded only when sent: to policy, absent and zero mean different things.
        let event = match risk {
            Some(risk) => event.with("risk", risk),
            None => event,
        };
        match decision {
            Decision::Allow { policies } => {
                let event = event.with("reason", format!("permitted by {}", policies.join(", ")));
                Ok(PolicyAnswer::Allow(event))
            }
            Decision::Deny { reason, .. } => Err(Box::new(Refused {
                error: Error::PermissionDenied(denial(&reason)),
                event: event.with("reason", reason),
            })),
            Decision::StepUp { requirement, .. } => {
                let rules = requirement.rules.join(", ");
                let event = event
                    .with("reason", format!("approval required by {rules}"))
                    .with("approval_required", requirement.describe());
                Ok(PolicyAnswer::StepUp(event, requirement))
            }
        }
    }
}

/// What policy said of a request it did not refuse.
pub enum PolicyAnswer {
    /// Allowed now; the decision's audit event.
    Allow(AuditEvent),
    /// Allowed once operators approve.
    StepUp(AuditEvent, ApprovalRequirement),
}

impl PolicyAnswer {
    /// For a request that cannot wait for approval (a renewal, a retry, a task being opened):
    /// the allow's event, or the refusal saying what approval the scope needs.
    pub fn allowed_now(
        self,
        field: &str,
        scope: &ScopeName,
        instead: &str,
    ) -> std::result::Result<AuditEvent, Box<Refused>> {
        match self {
            PolicyAnswer::Allow(event) => Ok(event),
            PolicyAnswer::StepUp(event, requirement) => Err(Box::new(Refused {
                error: Error::FailedPrecondition(format!(
                    "{field}: scope '{scope}' needs {} under policy {}; {instead}",
                    requirement.describe(),
                    requirement.rules.join(", ")
                )),
                event,
            })),
        }
    }
}

fn decided(
    caller: &Caller,
    task_id: &TaskId,
    scope: &ScopeName,
    outcome: &'static str,
) -> AuditEvent {
    AuditEvent::new("grant.decided", outcome, caller.name.as_str())
        .workload(&caller.name)
        .task(task_id)
        .scope(scope)
}
