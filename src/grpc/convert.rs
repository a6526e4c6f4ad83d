//! Conversions between domain values and protobuf messages.

use std::collections::HashMap;

use prost_types::Timestamp;

use crate::audit::verify::Anchor;
use crate::broker::IssuedLease;
use crate::domain::ToolDefinition;
use crate::domain::task::{GrantRequestState, Verdict};
use crate::domain::{CredentialKind, LeaseState, RevocationReason, Role, TaskState, UnixMillis};
use crate::error::Error;
use crate::issuer::{Jwk, VerifyingKey};
use crate::proto;
use crate::store::{AuditRecord, Checkpoint, GrantRequestRecord, WorkloadRecord};

pub fn timestamp(at: UnixMillis) -> Timestamp {
    Timestamp {
        seconds: at.0.div_euclid(1000),
        nanos: (at.0.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp as milliseconds since the epoch (saturating).
pub fn millis(at: &Timestamp) -> UnixMillis {
    UnixMillis(
        at.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(at.nanos / 1_000_000)),
    )
}

pub fn audit_event(record: AuditRecord) -> proto::AuditEvent {
    let event = record.event;
    proto::AuditEvent {
        seq: record
            .seq
            .and_then(|seq| u64::try_from(seq).ok())
            .unwrap_or_default(),
        id: event.id,
        occurred_at: Some(timestamp(UnixMillis(event.occurred_at))),
        r#type: event.event_type,
        outcome: event.outcome,
        actor: event.actor,
        workload: event.workload.unwrap_or_default(),
        task_id: event.task_id.unwrap_or_default(),
        scope: event.scope.unwrap_or_default(),
        lease_id: event.lease_id.unwrap_or_default(),
        detail_json: event.detail_json,
        context_json: event.context_json.unwrap_or_default(),
        prev_hash: event.prev_hash,
        hash: event.hash,
    }
}

pub fn task_state(state: TaskState) -> proto::TaskState {
    match state {
        TaskState::Active => proto::TaskState::Active,
        TaskState::Completed => proto::TaskState::Completed,
        TaskState::Expired => proto::TaskState::Expired,
        TaskState::Revoked => proto::TaskState::Revoked,
    }
}

fn lease_state(state: LeaseState) -> proto::LeaseState {
    match state {
        LeaseState::PendingApproval => proto::LeaseState::PendingApproval,
        LeaseState::Issued => proto::LeaseState::Issued,
        LeaseState::Denied => proto::LeaseState::Denied,
        LeaseState::Expired => proto::LeaseState::Expired,
        LeaseState::Revoked => proto::LeaseState::Revoked,
    }
}

fn credential_kind(kind: CredentialKind) -> proto::CredentialKind {
    match kind {
        CredentialKind::Jwt => proto::CredentialKind::Jwt,
        CredentialKind::ApiKey => proto::CredentialKind::ApiKey,
    }
}

pub fn revocation_reason(reason: RevocationReason) -> proto::RevocationReason {
    match reason {
        RevocationReason::TaskCompleted => proto::RevocationReason::TaskCompleted,
        RevocationReason::Revoked => proto::RevocationReason::Revoked,
        RevocationReason::LeaseExpired => proto::RevocationReason::LeaseExpired,
        RevocationReason::TaskExpired => proto::RevocationReason::TaskExpired,
    }
}

pub fn role(role: Role) -> proto::Role {
    match role {
        Role::Agent => proto::Role::Agent,
        Role::Admin => proto::Role::Admin,
        Role::ResourceServer => proto::Role::ResourceServer,
        Role::Operator => proto::Role::Operator,
    }
}

pub fn role_from_proto(role: proto::Role) -> Option<Role> {
    match role {
        proto::Role::Agent => Some(Role::Agent),
        proto::Role::Admin => Some(Role::Admin),
        proto::Role::ResourceServer => Some(Role::ResourceServer),
        proto::Role::Operator => Some(Role::Operator),
        proto::Role::Unspecified => None,
    }
}

pub fn lease(lease: IssuedLease) -> proto::Lease {
    let record = lease.record;
    proto::Lease {
        lease_id: record.id.as_str().to_owned(),
        scope: record.scope.as_str().to_owned(),
        kind: credential_kind(record.kind).into(),
        state: lease_state(record.state).into(),
        audience: record.audience,
        issued_at: Some(timestamp(record.window.issued_at)),
        expires_at: Some(timestamp(record.window.expires_at)),
        credential: lease
            .credential
            .map(|credential| credential.expose().to_owned())
            .unwrap_or_default(),
    }
}

pub fn workload(workload: WorkloadRecord) -> proto::Workload {
    proto::Workload {
        name: workload.name.as_str().to_owned(),
        spiffe_id: workload.spiffe_id.as_str().to_owned(),
        roles: workload.roles.into_iter().map(|r| role(r).into()).collect(),
        created_at: Some(timestamp(workload.created_at)),
        audiences: workload.audiences,
        selectors: workload.selectors,
        revoked_at: workload.revoked_at.map(timestamp),
        labels: workload
            .labels
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
    }
}

/// A trust anchor from a `VerifyAudit` request; errors name the field.
pub fn audit_anchor(anchor: proto::AuditAnchor) -> Result<Anchor, Error> {
    let checkpoint = anchor
        .checkpoint
        .ok_or_else(|| Error::invalid("anchor.checkpoint", "is required"))?;
    let mut keys = HashMap::new();
    for (index, jwk) in anchor.keys.into_iter().enumerate() {
        let key = VerifyingKey::from_jwk(&Jwk::from(jwk))
            .map_err(|error| Error::invalid(format!("anchor.keys[{index}]"), error))?;
        keys.insert(key.kid.clone(), key);
    }
    if keys.is_empty() {
        return Err(Error::invalid(
            "anchor.keys",
            "at least one key is required",
        ));
    }
    Ok(Anchor {
        checkpoint: Checkpoint {
            seq: i64::try_from(checkpoint.seq)
                .map_err(|_| Error::invalid("anchor.checkpoint.seq", "is out of range"))?,
            head_hash: checkpoint.head_hash,
            kid: checkpoint.kid,
            signature: checkpoint.signature,
        },
        keys,
    })
}

pub fn grant_state(state: GrantRequestState) -> proto::GrantState {
    match state {
        GrantRequestState::Pending => proto::GrantState::Pending,
        GrantRequestState::Issued => proto::GrantState::Issued,
        GrantRequestState::Denied => proto::GrantState::Denied,
        GrantRequestState::Expired => proto::GrantState::Expired,
        GrantRequestState::Cancelled => proto::GrantState::Cancelled,
    }
}

/// A grant request as its agent sees it; `lease` once issued.
pub fn grant_status(
    request: &GrantRequestRecord,
    lease: Option<IssuedLease>,
) -> proto::GrantStatus {
    proto::GrantStatus {
        lease_id: request.id.as_str().to_owned(),
        state: grant_state(request.state).into(),
        approvals: approvals_of(request),
        quorum: request.quorum,
        wait_until: Some(timestamp(request.wait_until)),
        reason: request.reason.clone().unwrap_or_default(),
        lease: lease.map(self::lease),
        scope: request.scope.as_str().to_owned(),
    }
}

/// A grant request as operators see it.
pub fn pending_grant(request: GrantRequestRecord) -> proto::PendingGrant {
    proto::PendingGrant {
        lease_id: request.id.as_str().to_owned(),
        task_id: request.task_id.as_str().to_owned(),
        workload: request.workload_name,
        scope: request.scope.as_str().to_owned(),
        ttl_seconds: request.ttl_seconds,
        request_digest: request.request_digest,
        detail_json: request.detail_json,
        quorum: request.quorum,
        approver_labels: request.approver_labels,
        created_at: Some(timestamp(request.created_at)),
        wait_until: Some(timestamp(request.wait_until)),
        approvals: request
            .approvals
            .into_iter()
            .map(|approval| proto::Approval {
                approver: approval.approver_name,
                verdict: approval.verdict.as_str().to_owned(),
                reason: approval.reason,
                decided_at: Some(timestamp(approval.decided_at)),
            })
            .collect(),
    }
}

pub fn tool(tool: &ToolDefinition) -> proto::Tool {
    proto::Tool {
        name: tool.name.clone(),
        description: tool.description.clone(),
        audience: tool.audience.clone(),
        arguments: tool
            .arguments
            .iter()
            .map(|(name, spec)| proto::ToolArgument {
                name: name.clone(),
                r#type: spec.kind.as_str().to_owned(),
                required: spec.required,
                sensitive: spec.sensitive,
            })
            .collect(),
    }
}

/// How many distinct operators approved `request`.
pub fn approvals_of(request: &GrantRequestRecord) -> u32 {
    let approving = request
        .approvals
        .iter()
        .filter(|approval| approval.verdict == Verdict::Approve)
        .count();
    u32::try_from(approving).unwrap_or(u32::MAX)
}
