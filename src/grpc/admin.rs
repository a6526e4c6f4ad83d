//! The `Admin` service: registering workloads, revoking, rotating keys.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::authenticate;
use super::convert;
use crate::broker::{Broker, RevocationTarget};
use crate::domain::{Caller, LeaseId, Role, TaskId, WorkloadName};
use crate::error::Error;
use crate::proto;
use crate::proto::revoke_request::Target;

pub struct AdminService {
    broker: Arc<Broker>,
}

impl AdminService {
    pub fn new(broker: Arc<Broker>) -> Self {
        AdminService { broker }
    }

    /// The caller, if it holds the admin role.
    async fn admin<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let caller = authenticate(self.broker.store(), request).await?;
        caller.require(Role::Admin)?;
        Ok(caller)
    }
}

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    async fn create_workload(
        &self,
        request: Request<proto::CreateWorkloadRequest>,
    ) -> Result<Response<proto::CreateWorkloadResponse>, Status> {
        let caller = self.admin(&request).await?;
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
            .create_workload(caller.name.as_str(), name, roles)
            .await?;
        Ok(Response::new(proto::CreateWorkloadResponse {
            workload: Some(convert::workload(workload)),
            credential: credential.expose().to_owned(),
        }))
    }

    async fn list_workloads(
        &self,
        request: Request<proto::ListWorkloadsRequest>,
    ) -> Result<Response<proto::ListWorkloadsResponse>, Status> {
        self.admin(&request).await?;
        let workloads = self.broker.store().list_workloads().await?;
        Ok(Response::new(proto::ListWorkloadsResponse {
            workloads: workloads.into_iter().map(convert::workload).collect(),
        }))
    }

    async fn revoke(
        &self,
        request: Request<proto::RevokeRequest>,
    ) -> Result<Response<proto::RevokeResponse>, Status> {
        let caller = self.admin(&request).await?;
        let target = match &request.get_ref().target {
            Some(Target::LeaseId(id)) => RevocationTarget::Lease(LeaseId::parse("lease_id", id)?),
            Some(Target::TaskId(id)) => RevocationTarget::Task(TaskId::parse("task_id", id)?),
            None => return Err(Error::invalid("target", "set lease_id or task_id").into()),
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
        let caller = self.admin(&request).await?;
        let rotation = self.broker.rotate_signing_key(&caller).await?;
        Ok(Response::new(proto::RotateSigningKeyResponse {
            new_kid: rotation.new_kid,
            retired_kid: rotation.retired_kid,
            retired_key_published_until: Some(convert::timestamp(
                rotation.retired_key_published_until,
            )),
        }))
    }
}
