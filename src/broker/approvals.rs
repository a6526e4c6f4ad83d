//! Grants that wait for people: a request policy answered with a step-up is stored with what
//! operators need to judge it and a digest of exactly what was asked; operators answer it; the
//! approval that reaches the quorum issues the lease (its TTL starting then), and the agent
//! receives the credential through `WatchGrant`.

use super::{Broker, Credential, IssuedLease, is_live, issued_lease_record, task_not_active};
use crate::audit::AuditEvent;
use crate::domain::task::{GrantRequestState, Verdict};
use crate::domain::tool::CallBinding;
use crate::domain::{Caller, LeaseId, ScopeName, UnixMillis};
use crate::error::{Error, Result};
use crate::metrics::CredentialLabels;
use crate::policy::ApprovalRequirement;
use crate::store::{
    ApprovalRecord, GrantDecision, GrantDecisionOutcome, GrantRequestInsertion, GrantRequestRecord,
    LeaseRecord, PendingFilter, TaskRecord,
};

/// Requests one workload may have waiting at once; more are refused with RESOURCE_EXHAUSTED, so
/// an agent steered into asking again and again cannot bury the operators' queue.
pub const MAX_PENDING_PER_WORKLOAD: u32 = 20;
/// The longest reason an operator may give.
pub const MAX_REASON_BYTES: usize = 512;

/// What `RequestGrant` answers.
#[derive(Debug)]
pub enum GrantAnswer {
    Issued(IssuedLease),
    /// Waiting for operators.
    Pending(GrantRequestRecord),
}

/// Where a grant request stands, for its agent.
#[derive(Debug)]
pub enum GrantStatus {
    /// Still waiting (or ended: denied, expired, cancelled).
    Request(GrantRequestRecord),
    /// Issued: the lease, with a fresh credential while it lives.
    Issued(GrantRequestRecord, Box<IssuedLease>),
}

/// A stepped-up request to hold.
pub struct HeldGrant<'a> {
    pub task: &'a TaskRecord,
    pub scope: &'a ScopeName,
    pub ttl_seconds: u32,
    pub risk: Option<u32>,
    pub requirement: ApprovalRequirement,
    /// For a tool call: the call the token will be bound to.
    pub call: Option<HeldCall<'a>>,
}

/// The tool call a held request is for.
pub struct HeldCall<'a> {
    pub binding: CallBinding,
    /// The arguments as operators may see them (sensitive values redacted).
    pub shown: &'a serde_json::Value,
}

/// The key of a held request's detail that holds its tool call.
const TOOL_CALL_DETAIL: &str = "tool_call";

impl Broker {
    /// Stores a stepped-up request with the decision's audit event.
    pub(super) async fn hold_for_approval(
        &self,
        caller: &Caller,
        held: HeldGrant<'_>,
        decision_event: AuditEvent,
        now: UnixMillis,
    ) -> Result<GrantRequestRecord> {
        let task = held.task;
        let mut detail = serde_json::json!({
            "approval_rules": held.requirement.rules,
            "labels": task.context.labels,
            "planned_tools": task.context.planned_tools,
            "prompt_digest": task.context.prompt_digest,
            "purpose": task.purpose,
            "risk": held.risk,
        });
        if let Some(call) = &held.call {
            detail[TOOL_CALL_DETAIL] = serde_json::json!({
                "arguments": call.shown,
                "arguments_digest": call.binding.arguments_digest,
                "tool": call.binding.tool,
            });
        }
        let binding = held.call.as_ref().map(|call| &call.binding);
        let request = GrantRequestRecord {
            id: LeaseId::generate(now),
            task_id: task.id.clone(),
            workload_id: caller.workload_id.clone(),
            workload_name: caller.name.to_string(),
            scope: held.scope.clone(),
            ttl_seconds: held.ttl_seconds,
            request_digest: request_digest(task, held.scope, held.ttl_seconds, held.risk, binding),
            detail_json: detail.to_string(),
            quorum: held.requirement.quorum,
            approver_labels: held.requirement.approver_labels.clone(),
            state: GrantRequestState::Pending,
            created_at: now,
            wait_until: now.plus(held.requirement.wait),
            decided_at: None,
            reason: None,
            approvals: Vec::new(),
        };
        let waiting = AuditEvent::new("grant.pending", "ok", caller.name.as_str())
            .workload(&caller.name)
            .task(&task.id)
            .scope(held.scope)
            .lease(&request.id)
            .context(&task.context.to_json())
            .with("quorum", request.quorum)
            .with("approver_labels", request.approver_labels.clone())
            .with("wait_until", request.wait_until.0)
            .with("request_digest", request.request_digest.as_str());
        match self
            .store
            .insert_grant_request(
                request.clone(),
                MAX_PENDING_PER_WORKLOAD,
                now,
                vec![decision_event, waiting],
                self.settings
                    .approval_webhook
                    .then(|| crate::webhook::approval_job(&request, now))
                    .into_iter()
                    .collect(),
            )
            .await?
        {
            GrantRequestInsertion::Inserted => Ok(request),
            GrantRequestInsertion::TaskNotActive => Err(task_not_active(&task.id)),
            GrantRequestInsertion::TooManyPending(pending) => {
                Err(Error::ResourceExhausted(format!(
                    "scope: {pending} requests of this workload already wait for approval (at most \
                 {MAX_PENDING_PER_WORKLOAD}); wait for them to be decided"
                )))
            }
        }
    }

    /// A page of the requests still waiting, oldest first, after `after`; and the id the next
    /// page starts after, if the page was full.
    pub async fn pending_grants(
        &self,
        after: Option<&LeaseId>,
        filter: &PendingFilter,
        limit: usize,
    ) -> Result<(Vec<GrantRequestRecord>, Option<LeaseId>)> {
        let page = self
            .store
            .pending_grant_requests(after, filter, limit, UnixMillis::now())
            .await?;
        let next = (page.len() == limit)
            .then(|| page.last().map(|last| last.id.clone()))
            .flatten();
        Ok((page, next))
    }

    /// An operator's answer to request `id`. Refused before anything is stored: an unknown
    /// request, the requester answering itself, an approver without the labels the rule asks
    /// for, a digest that is not the request's, an empty reason.
    pub async fn answer_grant(
        &self,
        caller: &Caller,
        id: &LeaseId,
        verdict: Verdict,
        reason: String,
        expected_digest: Option<String>,
    ) -> Result<(GrantDecisionOutcome, GrantRequestRecord)> {
        if reason.trim().is_empty() || reason.len() > MAX_REASON_BYTES {
            return Err(Error::invalid(
                "reason",
                format!("must be 1 to {MAX_REASON_BYTES} bytes (why you decide so)"),
            ));
        }
        let request = self
            .store
            .find_grant_request(id)
            .await?
            .ok_or_else(|| unknown_request(id))?;
        if request.workload_id == caller.workload_id {
            return Err(Error::PermissionDenied(format!(
                "lease_id: workload '{}' asked for this grant and may not answer it",
                caller.name
            )));
        }
        let held: Vec<String> = caller.labels.pairs().collect();
        if let Some(missing) = request
            .approver_labels
            .iter()
            .find(|label| !held.contains(label))
        {
            return Err(Error::PermissionDenied(format!(
                "lease_id: this request needs approvers with {}; workload '{}' lacks {missing}",
                request.approver_labels.join(", "),
                caller.name
            )));
        }
        if let Some(expected) = expected_digest
            && expected != request.request_digest
        {
            return Err(Error::FailedPrecondition(format!(
                "request_digest: the request is {}, not the one you judged",
                request.request_digest
            )));
        }
        let now = UnixMillis::now();
        // A denial needs no lease: it must go through even when none could be issued.
        let lease = match verdict {
            Verdict::Approve => Some(self.approved_lease(&request, now).await?),
            Verdict::Deny => None,
        };
        let answered = AuditEvent::new(
            match verdict {
                Verdict::Approve => "grant.approved",
                Verdict::Deny => "grant.denied",
            },
            "ok",
            caller.name.as_str(),
        )
        .workload(&request.workload_name)
        .task(&request.task_id)
        .scope(&request.scope)
        .lease(&request.id)
        .with("reason", reason.as_str())
        .with("request_digest", request.request_digest.as_str());
        let issued = lease.iter().map(|lease| {
            AuditEvent::new("lease.issued", "ok", caller.name.as_str())
                .workload(&request.workload_name)
                .task(&request.task_id)
                .lease(&request.id)
                .scope(&request.scope)
                .with("kind", lease.kind.as_str())
                .with("audience", lease.audience.as_str())
                .with("expires_at", lease.window.expires_at.0)
                .with("approved_by_quorum", request.quorum)
        });
        let issued_events = issued.collect();
        let issued_labels = lease.as_ref().map(|lease| CredentialLabels {
            kind: lease.kind.as_str().to_owned(),
            scope: lease.scope.to_string(),
        });
        let decision = GrantDecision {
            request_id: request.id.clone(),
            approval: ApprovalRecord {
                approver_id: caller.workload_id.clone(),
                approver_name: caller.name.to_string(),
                verdict,
                reason,
                decided_at: now,
            },
            lease,
            events: vec![answered],
            issued_events,
        };
        let outcome = self.store.decide_grant_request(decision, now).await?;
        let ended = match outcome {
            GrantDecisionOutcome::Expired => Some("grant.expired"),
            GrantDecisionOutcome::TaskEnded => Some("grant.cancelled"),
            _ => None,
        };
        if let (GrantDecisionOutcome::Issued, Some(labels)) = (&outcome, &issued_labels) {
            self.metrics.credentials_issued.get_or_create(labels).inc();
        }
        if let Some(event_type) = ended {
            let event = AuditEvent::new(event_type, "ok", caller.name.as_str())
                .workload(&request.workload_name)
                .task(&request.task_id)
                .scope(&request.scope)
                .lease(&request.id);
            self.store.record_events(vec![event]).await?;
        }
        let after = self
            .store
            .find_grant_request(id)
            .await?
            .ok_or_else(|| Error::internal("a grant request vanished"))?;
        match &outcome {
            GrantDecisionOutcome::Unknown => Err(unknown_request(id)),
            GrantDecisionOutcome::NotPending(state) => Err(Error::FailedPrecondition(format!(
                "lease_id: grant request {id} is already {}",
                state.as_str()
            ))),
            GrantDecisionOutcome::Expired => Err(Error::FailedPrecondition(format!(
                "lease_id: grant request {id} expired before this answer"
            ))),
            GrantDecisionOutcome::TaskEnded => Err(Error::FailedPrecondition(format!(
                "lease_id: the task of grant request {id} has ended; the request is cancelled"
            ))),
            _ => Ok((outcome, after)),
        }
    }

    /// The lease that issuing `request` at `now` creates: the request's id, its TTL counted
    /// from now, within its task's deadline.
    async fn approved_lease(
        &self,
        request: &GrantRequestRecord,
        now: UnixMillis,
    ) -> Result<LeaseRecord> {
        let definition = self
            .catalog
            .lease_definition(&request.scope)
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "lease_id: scope '{}' is no longer in the catalog",
                    request.scope
                ))
            })?;
        let task = self
            .store
            .find_task(&request.task_id, &request.workload_id)
            .await?
            .ok_or_else(|| task_not_active(&request.task_id))?;
        let ttl = crate::domain::task::parse_ttl_seconds(
            "ttl_seconds",
            request.ttl_seconds,
            definition.max_ttl,
        )?;
        Ok(issued_lease_record(
            request.id.clone(),
            &task,
            definition,
            ttl,
            now,
            &self.keyring.current(),
        ))
    }

    /// Marks the requests whose wait has ended as expired, each audited (the housekeeping
    /// loop's half of expiry; an answer or a watcher also sees the wait's end at once).
    pub async fn expire_grant_requests(&self) -> Result<usize> {
        const BATCH: usize = 500;
        let mut expired = 0;
        loop {
            let requests = self
                .store
                .expire_grant_requests(UnixMillis::now(), BATCH)
                .await?;
            let events = requests
                .iter()
                .map(|request| {
                    AuditEvent::new("grant.expired", "ok", crate::audit::REAPER)
                        .workload(&request.workload_name)
                        .task(&request.task_id)
                        .scope(&request.scope)
                        .lease(&request.id)
                        .with("reason", crate::store::records::GRANT_NOT_DECIDED_IN_TIME)
                })
                .collect::<Vec<_>>();
            expired += requests.len();
            if !events.is_empty() {
                self.store.record_events(events).await?;
            }
            if requests.len() < BATCH {
                return Ok(expired);
            }
        }
    }

    /// Where the caller's own request `id` stands; once issued, with a fresh credential for
    /// its lease while the lease lives (each delivery audited).
    pub async fn grant_status(&self, caller: &Caller, id: &LeaseId) -> Result<GrantStatus> {
        let mut request = self
            .store
            .find_grant_request(id)
            .await?
            .filter(|request| request.workload_id == caller.workload_id)
            .ok_or_else(|| unknown_request(id))?;
        let now = UnixMillis::now();
        if request.state == GrantRequestState::Pending && request.wait_until <= now {
            // Undecided in time: expired, whether or not an answer has yet recorded it.
            request.state = GrantRequestState::Expired;
            request.reason = Some(crate::store::records::GRANT_NOT_DECIDED_IN_TIME.into());
        }
        if request.state != GrantRequestState::Issued {
            return Ok(GrantStatus::Request(request));
        }
        let record = self
            .store
            .find_lease(id, &caller.workload_id)
            .await?
            .ok_or_else(|| Error::internal("an issued grant request has no lease"))?;
        let key = self.keyring.current();
        // A call token is signed for the call it was approved for.
        let credential: Option<Credential> = is_live(&record, now)
            .then(|| match call_binding(&request) {
                Some(call) => Some(self.mint(caller, &record, &key, Some(&call))),
                None => self.fresh_credential(caller, &record, &key),
            })
            .flatten();
        let mut lease = IssuedLease { record, credential };
        if lease.credential.is_some() {
            let event = self.issuance_event(caller, "lease.delivered", &lease);
            self.store.record_events(vec![event]).await?;
        } else {
            // An API key: handed out (and audited) by the first delivery only.
            self.hand_out_keys(caller, std::slice::from_mut(&mut lease))
                .await?;
        }
        Ok(GrantStatus::Issued(request, Box::new(lease)))
    }
}

/// Unknown, or not the caller's to watch: the same answer, so nothing leaks.
fn unknown_request(id: &LeaseId) -> Error {
    Error::NotFound {
        kind: "grant request",
        id: id.to_string(),
    }
}

/// The tool call a held request is for, if it is one (from its stored detail).
fn call_binding(request: &GrantRequestRecord) -> Option<CallBinding> {
    let detail: serde_json::Value = serde_json::from_str(&request.detail_json).ok()?;
    serde_json::from_value(detail.get(TOOL_CALL_DETAIL)?.clone()).ok()
}

/// SHA-256 (hex) of exactly what was asked: the task and its context, the scope, the TTL, the
/// risk signal and, for a tool call, the tool and the arguments' digest, as JSON with sorted
/// keys.
fn request_digest(
    task: &TaskRecord,
    scope: &ScopeName,
    ttl_seconds: u32,
    risk: Option<u32>,
    call: Option<&CallBinding>,
) -> String {
    let mut canonical = serde_json::json!({
        "labels": task.context.labels,
        "planned_tools": task.context.planned_tools,
        "prompt_digest": task.context.prompt_digest,
        "purpose": task.purpose,
        "risk": risk,
        "scope": scope.as_str(),
        "task_id": task.id.as_str(),
        "ttl_seconds": ttl_seconds,
    });
    if let Some(call) = call {
        // Sorted keys: the call's fields go after every key above.
        canonical[TOOL_CALL_DETAIL] = serde_json::json!({
            "arguments_digest": call.arguments_digest,
            "tool": call.tool,
        });
    }
    crate::domain::ids::sha256_hex(canonical.to_string().as_bytes())
}
