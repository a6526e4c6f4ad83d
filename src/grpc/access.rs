//! Which role may call which RPC: one table, deny by default. Every authenticated handler asks
//! [`authorize`] with its own [`Rpc`]; an RPC missing from the table is refused to every role.

use crate::domain::{Caller, Role};
use crate::error::Error;

/// Every RPC that needs an identity. `Tokens.GetJwks` and `Attestation.Attest` are not here:
/// the keys are public (they are served over HTTP too), and attestation is itself the proof.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    BeginTask,
    RequestGrant,
    WatchGrant,
    AuthorizeToolCall,
    ListTools,
    ListPending,
    WatchPending,
    Approve,
    Deny,
    RenewLease,
    CompleteTask,
    Introspect,
    WatchRevocations,
    CreateWorkload,
    ListWorkloads,
    RotateWorkloadCredential,
    RevokeWorkloadCredentials,
    Revoke,
    RotateSigningKey,
    RotateCa,
    ReloadPolicy,
    QueryAudit,
    ExportAudit,
    VerifyAudit,
    GetAuditAnchor,
    AuditHash,
    CreateJoinToken,
    RevokeIdentity,
    DeleteWorkload,
    RenewSvid,
}

impl Rpc {
    /// Its gRPC name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::BeginTask => "Tasks.BeginTask",
            Rpc::RequestGrant => "Tasks.RequestGrant",
            Rpc::WatchGrant => "Tasks.WatchGrant",
            Rpc::AuthorizeToolCall => "Tasks.AuthorizeToolCall",
            Rpc::ListTools => "Tasks.ListTools",
            Rpc::ListPending => "Approvals.ListPending",
            Rpc::WatchPending => "Approvals.WatchPending",
            Rpc::Approve => "Approvals.Approve",
            Rpc::Deny => "Approvals.Deny",
            Rpc::RenewLease => "Tasks.RenewLease",
            Rpc::CompleteTask => "Tasks.CompleteTask",
            Rpc::Introspect => "Tokens.Introspect",
            Rpc::WatchRevocations => "Tokens.WatchRevocations",
            Rpc::CreateWorkload => "Admin.CreateWorkload",
            Rpc::ListWorkloads => "Admin.ListWorkloads",
            Rpc::RotateWorkloadCredential => "Admin.RotateWorkloadCredential",
            Rpc::RevokeWorkloadCredentials => "Admin.RevokeWorkloadCredentials",
            Rpc::Revoke => "Admin.Revoke",
            Rpc::RotateSigningKey => "Admin.RotateSigningKey",
            Rpc::RotateCa => "Admin.RotateCa",
            Rpc::ReloadPolicy => "Admin.ReloadPolicy",
            Rpc::QueryAudit => "Admin.QueryAudit",
            Rpc::ExportAudit => "Admin.ExportAudit",
            Rpc::VerifyAudit => "Admin.VerifyAudit",
            Rpc::GetAuditAnchor => "Admin.GetAuditAnchor",
            Rpc::AuditHash => "Admin.AuditHash",
            Rpc::CreateJoinToken => "Admin.CreateJoinToken",
            Rpc::RevokeIdentity => "Admin.RevokeIdentity",
            Rpc::DeleteWorkload => "Admin.DeleteWorkload",
            Rpc::RenewSvid => "Attestation.RenewSvid",
        }
    }
}

/// The roles that may call `rpc`. Agents work on their own tasks only; a resource server
/// checks tokens of its own audiences (the handlers narrow it to them); admins manage the
/// broker and may check any token, but open no tasks.
pub fn allowed_roles(rpc: Rpc) -> &'static [Role] {
    match rpc {
        Rpc::BeginTask
        | Rpc::RequestGrant
        | Rpc::WatchGrant
        | Rpc::AuthorizeToolCall
        | Rpc::ListTools
        | Rpc::RenewLease
        | Rpc::CompleteTask => &[Role::Agent],
        Rpc::ListPending | Rpc::WatchPending | Rpc::Approve | Rpc::Deny => &[Role::Operator],
        Rpc::Introspect | Rpc::WatchRevocations => &[Role::ResourceServer, Role::Admin],
        // Any identity may renew its own SVID.
        Rpc::RenewSvid => &[
            Role::Agent,
            Role::ResourceServer,
            Role::Admin,
            Role::Operator,
        ],
        Rpc::CreateWorkload
        | Rpc::ListWorkloads
        | Rpc::RotateWorkloadCredential
        | Rpc::RevokeWorkloadCredentials
        | Rpc::Revoke
        | Rpc::RotateSigningKey
        | Rpc::RotateCa
        | Rpc::ReloadPolicy
        | Rpc::QueryAudit
        | Rpc::ExportAudit
        | Rpc::VerifyAudit
        | Rpc::GetAuditAnchor
        | Rpc::AuditHash
        | Rpc::CreateJoinToken
        | Rpc::RevokeIdentity
        | Rpc::DeleteWorkload => &[Role::Admin],
    }
}

/// Refuses `rpc` unless one of the caller's roles may call it.
pub fn authorize(caller: &Caller, rpc: Rpc) -> Result<(), Error> {
    let allowed = allowed_roles(rpc);
    if caller.roles.iter().any(|role| allowed.contains(role)) {
        return Ok(());
    }
    let names = |roles: &[Role]| {
        roles
            .iter()
            .map(|role| role.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(Error::PermissionDenied(format!(
        "workload '{}' (roles: {}) may not call {}: it needs the role {}",
        caller.name,
        names(&caller.roles),
        rpc.name(),
        names(allowed).replace(", ", " or ")
    )))
}
