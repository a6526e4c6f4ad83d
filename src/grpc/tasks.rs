//! The `Tasks` service: what agents call.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use tonic::{Request, Response, Status};

use super::access::Rpc;
use super::auth::authorize;
use super::convert;
use crate::broker::tool_calls::ToolCallAsk;
use crate::broker::{Broker, GrantAnswer, GrantStatus};
use crate::domain::task::GrantRequestState;
use crate::domain::task::{NewGrant, NewTask, parse_risk};
use crate::domain::{LeaseId, ScopeName, TaskContext, TaskId};
use crate::proto;
use crate::store::Topic;

/// How often a `WatchGrant` stream looks again without a notification.
const WATCH_GRANT_POLL: Duration = Duration::from_secs(1);

pub struct TasksService {
    broker: Arc<Broker>,
    /// Ends open `WatchGrant` streams when the broker stops.
    shutdown: watch::Receiver<bool>,
}

impl TasksService {
    pub fn new(broker: Arc<Broker>, shutdown: watch::Receiver<bool>) -> Self {
        TasksService { broker, shutdown }
    }

    async fn agent<T>(
        &self,
        request: &Request<T>,
        rpc: Rpc,
    ) -> Result<crate::domain::Caller, Status> {
        Ok(authorize(self.broker.credentials(), request, rpc).await?)
    }
}

#[tonic::async_trait]
impl proto::tasks_server::Tasks for TasksService {
    async fn begin_task(
        &self,
        request: Request<proto::BeginTaskRequest>,
    ) -> Result<Response<proto::BeginTaskResponse>, Status> {
        let caller = self.agent(&request, Rpc::BeginTask).await?;
        let message = request.into_inner();
        let context = message.context.unwrap_or_default();
        let context = TaskContext::parse(
            &context.prompt_digest,
            context.planned_tools,
            context.labels,
        )?;
        let new_task = NewTask::parse(
            message.purpose,
            &message.scopes,
            message.ttl_seconds,
            context,
            message.idempotency_key,
            self.broker.settings().max_task_ttl,
            message.risk,
        )?;
        let opened = self.broker.begin_task(&caller, new_task).await?;
        record_task(opened.task.id.as_str());
        Ok(Response::new(proto::BeginTaskResponse {
            task_id: opened.task.id.as_str().to_owned(),
            deadline: Some(convert::timestamp(opened.task.deadline)),
            leases: opened.leases.into_iter().map(convert::lease).collect(),
            replayed: opened.replayed,
            pending: opened
                .pending
                .iter()
                .map(|request| convert::grant_status(request, None))
                .collect(),
        }))
    }

    async fn request_grant(
        &self,
        request: Request<proto::RequestGrantRequest>,
    ) -> Result<Response<proto::RequestGrantResponse>, Status> {
        let caller = self.agent(&request, Rpc::RequestGrant).await?;
        let message = request.into_inner();
        let task_id = TaskId::parse("task_id", &message.task_id)?;
        record_task(task_id.as_str());
        let grant = NewGrant {
            task_id,
            scope: ScopeName::parse("scope", &message.scope)?,
            ttl_seconds: message.ttl_seconds,
            risk: parse_risk("risk", message.risk)?,
        };
        let answer = match self.broker.request_grant(&caller, grant).await? {
            GrantAnswer::Issued(lease) => proto::RequestGrantResponse {
                lease: Some(convert::lease(lease)),
                pending: None,
            },
            GrantAnswer::Pending(request) => proto::RequestGrantResponse {
                lease: None,
                pending: Some(convert::grant_status(&request, None)),
            },
        };
        Ok(Response::new(answer))
    }

    async fn authorize_tool_call(
        &self,
        request: Request<proto::AuthorizeToolCallRequest>,
    ) -> Result<Response<proto::AuthorizeToolCallResponse>, Status> {
        let caller = self.agent(&request, Rpc::AuthorizeToolCall).await?;
        let message = request.into_inner();
        let task_id = TaskId::parse("task_id", &message.task_id)?;
        record_task(task_id.as_str());
        let ask = ToolCallAsk {
            task_id,
            tool: message.tool,
            arguments_json: message.arguments_json,
            risk: parse_risk("risk", message.risk)?,
        };
        let answer = self.broker.authorize_tool_call(&caller, ask).await?;
        let (call_token, pending) = match answer.grant {
            GrantAnswer::Issued(lease) => (Some(convert::lease(lease)), None),
            GrantAnswer::Pending(request) => (None, Some(convert::grant_status(&request, None))),
        };
        Ok(Response::new(proto::AuthorizeToolCallResponse {
            call_token,
            pending,
            tool: answer.binding.tool,
            arguments_digest: answer.binding.arguments_digest,
        }))
    }

    async fn list_tools(
        &self,
        request: Request<proto::ListToolsRequest>,
    ) -> Result<Response<proto::ListToolsResponse>, Status> {
        let caller = self.agent(&request, Rpc::ListTools).await?;
        let task_id = TaskId::parse("task_id", &request.get_ref().task_id)?;
        let tools = self.broker.list_tools(&caller, &task_id).await?;
        Ok(Response::new(proto::ListToolsResponse {
            tools: tools.iter().map(convert::tool).collect(),
        }))
    }

    type WatchGrantStream = ReceiverStream<Result<proto::GrantStatus, Status>>;

    async fn watch_grant(
        &self,
        request: Request<proto::WatchGrantRequest>,
    ) -> Result<Response<Self::WatchGrantStream>, Status> {
        let caller = self.agent(&request, Rpc::WatchGrant).await?;
        let id = LeaseId::parse("lease_id", &request.get_ref().lease_id)?;
        // The first answer comes before the stream, so an unknown id is an error, not a stream.
        let first = self.broker.grant_status(&caller, &id).await?;
        let (sender, receiver) = mpsc::channel(4);
        let broker = self.broker.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut changes = broker.store().changes().subscribe(Topic::Approvals);
            let mut status = first;
            let mut last_sent = None;
            loop {
                let (message, is_final) = grant_message(status);
                if last_sent.as_ref() != Some(&message) {
                    if sender.send(Ok(message.clone())).await.is_err() {
                        return;
                    }
                    last_sent = Some(message);
                }
                if is_final {
                    return;
                }
                // A notification wakes the stream at once (this replica's answers, and the
                // others' on PostgreSQL); the timer catches a lost one and the request's expiry.
                tokio::select! {
                    _ = changes.changed() => {}
                    () = tokio::time::sleep(WATCH_GRANT_POLL) => {}
                    () = sender.closed() => return,
                    _ = shutdown.wait_for(|stopping| *stopping) => return,
                }
                status = match broker.grant_status(&caller, &id).await {
                    Ok(status) => status,
                    Err(error) => {
                        let _ = sender.send(Err(error.into())).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn renew_lease(
        &self,
        request: Request<proto::RenewLeaseRequest>,
    ) -> Result<Response<proto::RenewLeaseResponse>, Status> {
        let caller = self.agent(&request, Rpc::RenewLease).await?;
        let message = request.into_inner();
        let lease_id = LeaseId::parse("lease_id", &message.lease_id)?;
        let lease = self
            .broker
            .renew_lease(&caller, &lease_id, message.ttl_seconds)
            .await?;
        record_task(lease.record.task_id.as_str());
        Ok(Response::new(proto::RenewLeaseResponse {
            lease: Some(convert::lease(lease)),
        }))
    }

    async fn complete_task(
        &self,
        request: Request<proto::CompleteTaskRequest>,
    ) -> Result<Response<proto::CompleteTaskResponse>, Status> {
        let caller = self.agent(&request, Rpc::CompleteTask).await?;
        let task_id = TaskId::parse("task_id", &request.get_ref().task_id)?;
        record_task(task_id.as_str());
        let completed = self.broker.complete_task(&caller, &task_id).await?;
        Ok(Response::new(proto::CompleteTaskResponse {
            task_id: completed.task_id.as_str().to_owned(),
            state: convert::task_state(completed.state).into(),
            revoked_lease_ids: completed
                .revoked
                .iter()
                .map(|id| id.as_str().to_owned())
                .collect(),
            ended_at: Some(convert::timestamp(completed.ended_at)),
            already_completed: completed.already_completed,
        }))
    }
}

/// The stream message for `status`, and whether it is the last.
fn grant_message(status: GrantStatus) -> (proto::GrantStatus, bool) {
    match status {
        GrantStatus::Request(request) => {
            let is_final = request.state != GrantRequestState::Pending;
            (convert::grant_status(&request, None), is_final)
        }
        GrantStatus::Issued(request, lease) => {
            (convert::grant_status(&request, Some(*lease)), true)
        }
    }
}

/// Adds the task id to the call's span, so every log line of the call names the task.
fn record_task(task_id: &str) {
    tracing::Span::current().record("task_id", task_id);
}
