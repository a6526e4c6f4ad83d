//! The `Admin` service: registering workloads, revoking, rotating keys.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::access::Rpc;
use super::auth::authorize;
use super::convert;
use crate::audit::chain::Problem;
use crate::broker::{Broker, NewWorkload, RevocationTarget, RevokedIdentity};
use crate::domain::{
    Caller, Labels, LeaseId, ScopeName, SpiffeId, TaskId, UnixMillis, WorkloadName,
};
use crate::error::Error;
use crate::identity::selectors;
use crate::proto;
use crate::proto::revoke_request::Target;
use crate::store::{AuditFilter, IdentityEnd};

/// The most events one query returns.
const MAX_AUDIT_QUERY: u32 = 10_000;
/// Events read from the store per round trip of an export.
const EXPORT_PAGE: usize = 500;
/// The longest activation delay a rotation may ask for: a day.
const MAX_CA_ACTIVATION_DELAY_SECONDS: u32 = 86_400;

type AuditStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::AuditEvent, Status>> + Send>>;

pub struct AdminService {
    broker: Arc<Broker>,
}

impl AdminService {
    pub fn new(broker: Arc<Broker>) -> Self {
        AdminService { broker }
    }

    /// The caller, if its roles allow `rpc` (admin only).
    async fn admin<T>(&self, request: &Request<T>, rpc: Rpc) -> Result<Caller, Status> {
        Ok(authorize(self.broker.credentials(), request, rpc).await?)
    }
}

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    async fn create_workload(
        &self,
        request: Request<proto::CreateWorkloadRequest>,
    ) -> Result<Response<proto::CreateWorkloadResponse>, Status> {
        let caller = self.admin(&request, Rpc::CreateWorkload).await?;
        let message = request.into_inner();
        let name = WorkloadName::parse("name", &message.name)?;
        let mut roles = Vec::new();
        for (index, value) in message.roles.iter().enumerate() {
            let role = proto::Role::try_from(*value)
                .ok()
                .and_then(convert::role_from_proto)
                .ok_or_else(|| {
                    Error::invalid(format!("roles[{index}]"), format!("{value} is not a role"))
                })?;
            if !roles.contains(&role) {
                roles.push(role);
            }
        }
        if roles.is_empty() {
            return Err(Error::invalid("roles", "at least one role is required").into());
        }
        let (workload, credential) = self
            .broker
            .create_workload(
                caller.name.as_str(),
                NewWorkload {
                    name,
                    roles,
                    audiences: message.audiences,
                    selectors: selectors::parse("selectors", &message.selectors)?,
                    with_credential: !message.no_bearer_credential,
                    spiffe_id: match message.spiffe_id.as_str() {
                        "" => None,
                        text => Some(SpiffeId::parse(
                            "spiffe_id",
                            text,
                            &self.broker.settings().trust_domain,
                        )?),
                    },
                    labels: Labels::parse("labels", &message.labels)?,
                },
            )
            .await?;
        Ok(Response::new(proto::CreateWorkloadResponse {
            workload: Some(convert::workload(workload)),
            credential: credential
                .map(|credential| credential.expose().to_owned())
                .unwrap_or_default(),
        }))
    }

    async fn list_workloads(
        &self,
        request: Request<proto::ListWorkloadsRequest>,
    ) -> Result<Response<proto::ListWorkloadsResponse>, Status> {
        self.admin(&request, Rpc::ListWorkloads).await?;
        let workloads = self.broker.store().list_workloads().await?;
        Ok(Response::new(proto::ListWorkloadsResponse {
            workloads: workloads.into_iter().map(convert::workload).collect(),
        }))
    }

    async fn rotate_workload_credential(
        &self,
        request: Request<proto::RotateWorkloadCredentialRequest>,
    ) -> Result<Response<proto::RotateWorkloadCredentialResponse>, Status> {
        let caller = self.admin(&request, Rpc::RotateWorkloadCredential).await?;
        let name = WorkloadName::parse("name", &request.get_ref().name)?;
        let (workload, credential) = self
            .broker
            .rotate_workload_credential(&caller, &name)
            .await?;
        Ok(Response::new(proto::RotateWorkloadCredentialResponse {
            workload: Some(convert::workload(workload)),
            credential: credential.expose().to_owned(),
        }))
    }

    async fn revoke_workload_credentials(
        &self,
        request: Request<proto::RevokeWorkloadCredentialsRequest>,
    ) -> Result<Response<proto::RevokeWorkloadCredentialsResponse>, Status> {
        let caller = self.admin(&request, Rpc::RevokeWorkloadCredentials).await?;
        let name = WorkloadName::parse("name", &request.get_ref().name)?;
        let workload = self
            .broker
            .revoke_workload_credentials(&caller, &name)
            .await?;
        Ok(Response::new(proto::RevokeWorkloadCredentialsResponse {
            workload: Some(convert::workload(workload)),
        }))
    }

    async fn create_join_token(
        &self,
        request: Request<proto::CreateJoinTokenRequest>,
    ) -> Result<Response<proto::CreateJoinTokenResponse>, Status> {
        let caller = self.admin(&request, Rpc::CreateJoinToken).await?;
        let message = request.get_ref();
        let name = WorkloadName::parse("name", &message.name)?;
        let ttl = std::time::Duration::from_secs(message.ttl_seconds.into());
        let (token, expires_at) = self.broker.create_join_token(&caller, &name, ttl).await?;
        Ok(Response::new(proto::CreateJoinTokenResponse {
            join_token: token.expose().to_owned(),
            expires_at: Some(convert::timestamp(expires_at)),
        }))
    }

    async fn revoke_identity(
        &self,
        request: Request<proto::RevokeIdentityRequest>,
    ) -> Result<Response<proto::RevokeIdentityResponse>, Status> {
        let caller = self.admin(&request, Rpc::RevokeIdentity).await?;
        let name = WorkloadName::parse("name", &request.get_ref().name)?;
        let revoked = self
            .broker
            .revoke_identity(&caller, &name, IdentityEnd::Revoked)
            .await?;
        Ok(Response::new(revoked_identity(revoked)))
    }

    async fn delete_workload(
        &self,
        request: Request<proto::DeleteWorkloadRequest>,
    ) -> Result<Response<proto::RevokeIdentityResponse>, Status> {
        let caller = self.admin(&request, Rpc::DeleteWorkload).await?;
        let name = WorkloadName::parse("name", &request.get_ref().name)?;
        let revoked = self
            .broker
            .revoke_identity(&caller, &name, IdentityEnd::Deleted)
            .await?;
        Ok(Response::new(revoked_identity(revoked)))
    }

    async fn revoke(
        &self,
        request: Request<proto::RevokeRequest>,
    ) -> Result<Response<proto::RevokeResponse>, Status> {
        let caller = self.admin(&request, Rpc::Revoke).await?;
        let target = match &request.get_ref().target {
            Some(Target::LeaseId(id)) => RevocationTarget::Lease(LeaseId::parse("lease_id", id)?),
            Some(Target::TaskId(id)) => RevocationTarget::Task(TaskId::parse("task_id", id)?),
            Some(Target::Workload(name)) => {
                RevocationTarget::Workload(WorkloadName::parse("workload", name)?)
            }
            Some(Target::Scope(scope)) => {
                RevocationTarget::Scope(ScopeName::parse("scope", scope)?)
            }
            None => {
                return Err(
                    Error::invalid("target", "set lease_id, task_id, workload or scope").into(),
                );
            }
        };
        let revoked = self.broker.revoke(&caller, &target).await?;
        Ok(Response::new(proto::RevokeResponse {
            revoked_lease_ids: revoked.iter().map(|id| id.as_str().to_owned()).collect(),
        }))
    }

    async fn rotate_signing_key(
        &self,
        request: Request<proto::RotateSigningKeyRequest>,
    ) -> Result<Response<proto::RotateSigningKeyResponse>, Status> {
        let caller = self.admin(&request, Rpc::RotateSigningKey).await?;
        let rotation = self.broker.rotate_signing_key(&caller).await?;
        Ok(Response::new(proto::RotateSigningKeyResponse {
            new_kid: rotation.new_kid,
            retired_kid: rotation.retired_kid,
            retired_key_published_until: Some(convert::timestamp(
                rotation.retired_key_published_until,
            )),
        }))
    }

    async fn rotate_ca(
        &self,
        request: Request<proto::RotateCaRequest>,
    ) -> Result<Response<proto::RotateCaResponse>, Status> {
        let caller = self.admin(&request, Rpc::RotateCa).await?;
        let delay = match request.into_inner().activation_delay_seconds {
            None => crate::identity::ca::DEFAULT_ACTIVATION_DELAY,
            Some(seconds) if seconds <= MAX_CA_ACTIVATION_DELAY_SECONDS => {
                Duration::from_secs(seconds.into())
            }
            Some(_) => {
                return Err(Error::invalid(
                    "activation_delay_seconds",
                    format!("at most {MAX_CA_ACTIVATION_DELAY_SECONDS}"),
                )
                .into());
            }
        };
        let rotation = self.broker.rotate_ca(&caller, delay).await?;
        Ok(Response::new(proto::RotateCaResponse {
            new_ca_id: rotation.new_ca_id,
            activates_at: Some(convert::timestamp(rotation.activates_at)),
            retired_ca_id: rotation.retired_ca_id,
            retired_ca_published_until: Some(convert::timestamp(
                rotation.retired_ca_published_until,
            )),
        }))
    }

    async fn reload_policy(
        &self,
        request: Request<proto::ReloadPolicyRequest>,
    ) -> Result<Response<proto::ReloadPolicyResponse>, Status> {
        let caller = self.admin(&request, Rpc::ReloadPolicy).await?;
        let summary = self.broker.reload_policy(caller.name.as_str()).await?;
        Ok(Response::new(proto::ReloadPolicyResponse {
            source: summary.source,
            digest: summary.digest,
            policies: summary.decision_policies,
            approval_rules: summary.approval_rules,
        }))
    }

    async fn query_audit(
        &self,
        request: Request<proto::QueryAuditRequest>,
    ) -> Result<Response<proto::QueryAuditResponse>, Status> {
        self.admin(&request, Rpc::QueryAudit).await?;
        let message = request.into_inner();
        let text = |value: String| Some(value).filter(|value| !value.is_empty());
        let filter = AuditFilter {
            task_id: text(message.task_id),
            workload: text(message.workload),
            scope: text(message.scope),
            event_type: text(message.r#type),
            since: message.since.as_ref().map(convert::millis),
            until: message.until.as_ref().map(convert::millis),
            limit: i64::from(if message.limit == 0 {
                MAX_AUDIT_QUERY
            } else {
                message.limit.min(MAX_AUDIT_QUERY)
            }),
        };
        let events = self.broker.store().query_audit(filter).await?;
        Ok(Response::new(proto::QueryAuditResponse {
            events: events.into_iter().map(convert::audit_event).collect(),
        }))
    }

    type ExportAuditStream = AuditStream;

    async fn export_audit(
        &self,
        request: Request<proto::ExportAuditRequest>,
    ) -> Result<Response<AuditStream>, Status> {
        self.admin(&request, Rpc::ExportAudit).await?;
        let mut after = i64::try_from(request.get_ref().after_seq)
            .map_err(|_| Error::invalid("after_seq", "is beyond the trail"))?;
        let store = self.broker.store().clone();
        let (sender, receiver) = tokio::sync::mpsc::channel(EXPORT_PAGE);
        tokio::spawn(async move {
            loop {
                let page = match store.sealed_audit_events(after, EXPORT_PAGE).await {
                    Ok(page) => page,
                    Err(error) => {
                        let _ = sender.send(Err(Status::from(error))).await;
                        return;
                    }
                };
                let is_last = page.len() < EXPORT_PAGE;
                for record in page {
                    after = record.event.seq;
                    if sender.send(Ok(convert::audit_event(record))).await.is_err() {
                        return;
                    }
                }
                if is_last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn verify_audit(
        &self,
        request: Request<proto::VerifyAuditRequest>,
    ) -> Result<Response<proto::VerifyAuditResponse>, Status> {
        self.admin(&request, Rpc::VerifyAudit).await?;
        let anchor = request
            .into_inner()
            .anchor
            .map(convert::audit_anchor)
            .transpose()?;
        let report =
            crate::audit::verify::verify(self.broker.store().as_ref(), anchor.as_ref()).await?;
        let count = |n: i64| u64::try_from(n).unwrap_or_default();
        let problem = report.problem.unwrap_or_else(|| Problem {
            seq: 0,
            event_id: String::new(),
            description: String::new(),
        });
        Ok(Response::new(proto::VerifyAuditResponse {
            intact: problem.description.is_empty(),
            events_checked: count(report.events_checked),
            checkpoints_checked: report.checkpoints_checked as u64,
            unsealed: count(report.unsealed),
            problem_seq: count(problem.seq),
            problem_event_id: problem.event_id,
            problem: problem.description,
            last_checkpoint_seq: count(report.last_checkpoint_seq),
            anchored: anchor.is_some(),
            trusted_through_seq: count(report.trusted_through_seq),
            events_after_trusted: count(report.events_checked - report.trusted_through_seq),
        }))
    }

    async fn get_audit_anchor(
        &self,
        request: Request<proto::GetAuditAnchorRequest>,
    ) -> Result<Response<proto::AuditAnchor>, Status> {
        self.admin(&request, Rpc::GetAuditAnchor).await?;
        let checkpoint = self
            .broker
            .store()
            .checkpoints()
            .await?
            .pop()
            .ok_or_else(|| {
                Error::FailedPrecondition(
                    "no checkpoint has been signed yet; try again in a few seconds".into(),
                )
            })?;
        Ok(Response::new(proto::AuditAnchor {
            checkpoint: Some(proto::AuditCheckpoint {
                seq: u64::try_from(checkpoint.seq).unwrap_or_default(),
                head_hash: checkpoint.head_hash,
                kid: checkpoint.kid,
                signature: checkpoint.signature,
            }),
            keys: self
                .broker
                .keyring()
                .jwks(UnixMillis::now())
                .into_iter()
                .map(proto::Jwk::from)
                .collect(),
        }))
    }

    async fn audit_hash(
        &self,
        request: Request<proto::AuditHashRequest>,
    ) -> Result<Response<proto::AuditHashResponse>, Status> {
        self.admin(&request, Rpc::AuditHash).await?;
        let value = &request.get_ref().value;
        if value.is_empty() {
            return Err(Error::invalid("value", "is required").into());
        }
        Ok(Response::new(proto::AuditHashResponse {
            hmac: self.broker.audit_hash(value),
        }))
    }
}

/// What the kill switch did, as the `RevokeIdentity` and `DeleteWorkload` answer.
fn revoked_identity(revoked: RevokedIdentity) -> proto::RevokeIdentityResponse {
    proto::RevokeIdentityResponse {
        workload: Some(convert::workload(revoked.workload)),
        revoked_task_ids: revoked
            .revoked_tasks
            .iter()
            .map(|task| task.as_str().to_owned())
            .collect(),
        revoked_leases: u32::try_from(revoked.revoked_leases).unwrap_or(u32::MAX),
    }
}
