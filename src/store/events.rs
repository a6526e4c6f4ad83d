//! The audit rows a change writes, built the same way by every backend: an event's stored form
//! (with its task's owner and context filled in when the event names only the task), and the
//! audit event that records each revocation-feed event.

use std::collections::{HashMap, HashSet};

use super::records::FeedEvent;
use crate::audit::AuditEvent;
use crate::audit::chain::SealedEvent;
use crate::domain::RevocationReason;

/// Task id -> (owner's workload name, task context as JSON), for events that name a task only.
pub type TaskOwners = HashMap<String, (String, String)>;

/// The tasks whose owner or context `events` leave out, each once.
pub fn tasks_needing_owner<'e>(events: impl IntoIterator<Item = &'e AuditEvent>) -> Vec<&'e str> {
    let wanted: HashSet<&str> = events
        .into_iter()
        .filter(|event| event.workload.is_none() || event.context.is_none())
        .filter_map(|event| event.task_id.as_deref())
        .collect();
    wanted.into_iter().collect()
}

/// The stored form of `event`, not yet sealed (`seq` 0, no hashes).
pub fn audit_row(event: &AuditEvent, owners: &TaskOwners) -> SealedEvent {
    let owner = event.task_id.as_ref().and_then(|task| owners.get(task));
    let context_json = match &event.context {
        Some(context) => Some(context.to_string()),
        None => owner.map(|(_, context)| context.clone()),
    };
    SealedEvent {
        seq: 0,
        id: event.id.clone(),
        occurred_at: event.occurred_at.0,
        event_type: event.event_type.to_owned(),
        outcome: event.outcome.to_owned(),
        actor: event.actor.clone(),
        workload: event
            .workload
            .clone()
            .or_else(|| owner.map(|(name, _)| name.clone())),
        task_id: event.task_id.clone(),
        scope: event.scope.clone(),
        lease_id: event.lease_id.clone(),
        detail_json: event.detail.to_string(),
        context_json,
        prev_hash: String::new(),
        hash: String::new(),
    }
}

/// The audit event that records feed event `event`, caused by `actor`.
pub fn feed_audit_event(event: &FeedEvent, actor: &str) -> AuditEvent {
    let event_type = match (&event.lease_id, event.reason) {
        (Some(_), RevocationReason::LeaseExpired | RevocationReason::TaskExpired) => {
            "lease.expired"
        }
        (Some(_), _) => "lease.revoked",
        (None, RevocationReason::TaskCompleted) => "task.completed",
        (None, RevocationReason::TaskExpired | RevocationReason::LeaseExpired) => "task.expired",
        (None, RevocationReason::Revoked) => "task.revoked",
    };
    let mut audit = AuditEvent::new(event_type, "confirmed", actor)
        .task(&event.task_id)
        .with("reason", event.reason.as_str())
        .with("not_after", event.not_after.0);
    audit.occurred_at = event.occurred_at;
    if let Some(lease_id) = &event.lease_id {
        audit = audit.lease(lease_id);
    }
    if let Some(scope) = &event.scope {
        audit = audit.scope(scope);
    }
    audit
}
