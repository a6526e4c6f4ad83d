//! The `Approvals` service: what operators call to see the grants that wait for them and to
//! answer them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::access::Rpc;
use super::auth::authorize;
use super::convert;
use crate::broker::Broker;
use crate::domain::task::Verdict;
use crate::domain::{Caller, LeaseId};
use crate::domain::{ScopeName, UnixMillis, WorkloadName};
use crate::error::Error;
use crate::proto;
use crate::store::{GrantDecisionOutcome, GrantRequestRecord, PendingFilter, Topic};

/// Requests per page when the caller does not say.
const DEFAULT_PAGE_SIZE: u32 = 100;
/// The largest page.
const MAX_PAGE_SIZE: u32 = 500;
/// How often `WatchPending` looks again without a notification (one lost, or none between
/// replicas that do not share them).
const WATCH_PENDING_POLL: Duration = Duration::from_secs(1);
/// How far before the newest request seen `WatchPending` looks again: a request may commit
/// after a newer one (ids are made before the commit, and on several replicas), and replicas'
/// clocks differ a little.
const WATCH_PENDING_LOOKBACK: Duration = Duration::from_secs(30);
/// How often `WatchPending` looks back; in between it lists only ids after the newest seen,
/// so that a flood of waiting requests does not make each look list them all again.
const WATCH_PENDING_LOOK_BACK_EVERY: Duration = Duration::from_secs(2);

pub struct ApprovalsService {
    broker: Arc<Broker>,
    /// Ends open `WatchPending` streams when the broker stops.
    shutdown: watch::Receiver<bool>,
}

impl ApprovalsService {
    pub fn new(broker: Arc<Broker>, shutdown: watch::Receiver<bool>) -> Self {
        ApprovalsService { broker, shutdown }
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
        let filter = pending_filter(message.filter)?;
        let (requests, next) = self
            .broker
            .pending_grants(after.as_ref(), &filter, page_size as usize)
            .await?;
        Ok(Response::new(proto::ListPendingResponse {
            requests: requests.into_iter().map(convert::pending_grant).collect(),
            next_page_token: next.map(|id| id.as_str().to_owned()).unwrap_or_default(),
        }))
    }

    type WatchPendingStream = ReceiverStream<Result<proto::PendingGrant, Status>>;

    async fn watch_pending(
        &self,
        request: Request<proto::WatchPendingRequest>,
    ) -> Result<Response<Self::WatchPendingStream>, Status> {
        self.operator(&request, Rpc::WatchPending).await?;
        let filter = pending_filter(request.into_inner().filter)?;
        // Read once before the stream opens, so that a store that cannot answer is an error.
        let mut watcher = PendingWatcher::default();
        let first = watcher.next_batch(&self.broker, &filter).await?;
        let (sender, receiver) = mpsc::channel(64);
        let broker = self.broker.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut changes = broker.store().changes().subscribe(Topic::Approvals);
            let mut batch = first;
            loop {
                for request in batch {
                    if sender
                        .send(Ok(convert::pending_grant(request)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                tokio::select! {
                    _ = changes.changed() => {}
                    () = tokio::time::sleep(WATCH_PENDING_POLL) => {}
                    () = sender.closed() => return,
                    _ = shutdown.wait_for(|stopping| *stopping) => return,
                }
                batch = match watcher.next_batch(&broker, &filter).await {
                    Ok(batch) => batch,
                    Err(error) => {
                        let _ = sender.send(Err(error.into())).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
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

/// The filter of a listing; empty fields match everything, others must be well-formed.
fn pending_filter(filter: Option<proto::PendingFilter>) -> Result<PendingFilter, Error> {
    let filter = filter.unwrap_or_default();
    let workload = match filter.workload.as_str() {
        "" => None,
        name => Some(
            WorkloadName::parse("filter.workload", name)?
                .as_str()
                .to_owned(),
        ),
    };
    // A tool call's scope (`tool:<name>`) is a scope name too.
    let scope = match filter.scope.as_str() {
        "" => None,
        name => Some(ScopeName::parse("filter.scope", name)?.as_str().to_owned()),
    };
    Ok(PendingFilter {
        workload,
        scope,
        task: None,
    })
}

/// What one `WatchPending` stream has sent: each request once, however often it is listed.
#[derive(Default)]
struct PendingWatcher {
    /// Requests sent that are recent enough to be listed again.
    sent: HashSet<crate::domain::LeaseId>,
    /// The creation time of the newest request seen.
    newest: Option<UnixMillis>,
    /// The largest id seen.
    newest_id: Option<crate::domain::LeaseId>,
    /// When it last looked back over [`WATCH_PENDING_LOOKBACK`].
    looked_back: Option<std::time::Instant>,
}

impl PendingWatcher {
    /// The requests waiting now that this stream has not sent yet, oldest first: every one
    /// on the first call, then those after the newest one seen, and every
    /// [`WATCH_PENDING_LOOK_BACK_EVERY`] those created since a little before it.
    async fn next_batch(
        &mut self,
        broker: &Broker,
        filter: &PendingFilter,
    ) -> Result<Vec<GrantRequestRecord>, Error> {
        let look_back = self
            .looked_back
            .is_none_or(|at| at.elapsed() >= WATCH_PENDING_LOOK_BACK_EVERY);
        let mut after = if look_back {
            self.looked_back = Some(std::time::Instant::now());
            self.horizon()
        } else {
            self.newest_id.clone()
        };
        let mut fresh = Vec::new();
        loop {
            let (page, next) = broker
                .pending_grants(after.as_ref(), filter, MAX_PAGE_SIZE as usize)
                .await?;
            for request in page {
                self.newest = self.newest.max(Some(request.created_at));
                if self
                    .newest_id
                    .as_ref()
                    .is_none_or(|newest| newest.as_str() < request.id.as_str())
                {
                    self.newest_id = Some(request.id.clone());
                }
                if self.sent.insert(request.id.clone()) {
                    fresh.push(request);
                }
            }
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        // What is older than the next look's start is never listed again: forget it.
        if let Some(horizon) = self.horizon() {
            self.sent.retain(|id| id.as_str() >= horizon.as_str());
        }
        Ok(fresh)
    }

    /// Where the next look starts: a little before the newest request seen (ids sort by
    /// creation time), or at the beginning before any was seen.
    fn horizon(&self) -> Option<crate::domain::LeaseId> {
        let lookback = i64::try_from(WATCH_PENDING_LOOKBACK.as_millis()).unwrap_or(i64::MAX);
        self.newest.map(|newest| {
            crate::domain::LeaseId::first_at(UnixMillis(newest.0.saturating_sub(lookback)))
        })
    }
}
