//! The `Approvals` service: what operators call to see the grants that wait for them and to
//! answer them.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::access::Rpc;
use super::auth::authorize;
use super::convert;
use crate::broker::Broker;
use crate::domain::task::Verdict;
use crate::domain::{Caller, LeaseId};
use crate::error::Error;
use crate::proto;
use crate::store::GrantDecisionOutcome;

/// Requests per page when the caller does not say.
const DEFAULT_PAGE_SIZE: u32 = 100;
/// The largest page.
const MAX_PAGE_SIZE: u32 = 500;

pub struct ApprovalsService {
    broker: Arc<Broker>,
}

impl ApprovalsService {
    pub fn new(broker: Arc<Broker>) -> Self {
        ApprovalsService { broker }
    }

    async fn operator<T>(&self, request: &Request<T>, rpc: Rpc) -> Result<Caller, Status> {
        Ok(authorize(self.broker.credentials(), request, rpc).await?)
    }

    async fn answer(
        &self,
        request: Request<proto::AnswerRequest>,
        rpc: Rpc,
        verdict: Verdict,
    ) -> Result<Response<proto::AnswerResponse>, Status> {
        let caller = self.operator(&request, rpc).await?;
        let message = request.into_inner();
        let id = LeaseId::parse("lease_id", &message.lease_id)?;
        let expected = (!message.request_digest.is_empty()).then_some(message.request_digest);
        let (outcome, after) = self
            .broker
            .answer_grant(&caller, &id, verdict, message.reason, expected)
            .await?;
        Ok(Response::new(proto::AnswerResponse {
            state: convert::grant_state(after.state).into(),
            approvals: convert::approvals_of(&after),
            quorum: after.quorum,
            counted: outcome != GrantDecisionOutcome::AlreadyAnswered,
        }))
    }
}

#[tonic::async_trait]
impl proto::approvals_server::Approvals for ApprovalsService {
    async fn list_pending(
        &self,
        request: Request<proto::ListPendingRequest>,
    ) -> Result<Response<proto::ListPendingResponse>, Status> {
        self.operator(&request, Rpc::ListPending).await?;
        let message = request.into_inner();
        let page_size = match message.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size if size <= MAX_PAGE_SIZE => size,
            _ => {
                return Err(Error::invalid("page_size", format!("at most {MAX_PAGE_SIZE}")).into());
            }
        };
        let after = match message.page_token.as_str() {
            "" => None,
            token => Some(LeaseId::parse("page_token", token)?),
        };
        let (requests, next) = self
            .broker
            .pending_grants(after.as_ref(), page_size as usize)
            .await?;
        Ok(Response::new(proto::ListPendingResponse {
            requests: requests.into_iter().map(convert::pending_grant).collect(),
            next_page_token: next.map(|id| id.as_str().to_owned()).unwrap_or_default(),
        }))
    }

    async fn approve(
        &self,
        request: Request<proto::AnswerRequest>,
    ) -> Result<Response<proto::AnswerResponse>, Status> {
        self.answer(request, Rpc::Approve, Verdict::Approve).await
    }

    async fn deny(
        &self,
        request: Request<proto::AnswerRequest>,
    ) -> Result<Response<proto::AnswerResponse>, Status> {
        self.answer(request, Rpc::Deny, Verdict::Deny).await
    }
}
