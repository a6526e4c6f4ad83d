//! The `Tokens` service: what downstream APIs call to validate credentials.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::access::Rpc;
use super::auth::authorize;
use super::convert;
use crate::broker::{ActiveToken, Broker, IntendedUse, Introspection};
use crate::domain::{Caller, Role, UnixMillis};
use crate::error::Error;
use crate::proto;

/// Revocation streams one workload may hold open at once: a verifier needs one per process,
/// and each stream costs the broker a reader task.
pub const MAX_SUBSCRIPTIONS_PER_CALLER: usize = 16;

pub struct TokensService {
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
    subscriptions: Arc<Mutex<HashMap<String, usize>>>,
}

impl TokensService {
    pub fn new(broker: Arc<Broker>, shutdown: watch::Receiver<bool>) -> Self {
        TokensService {
            broker,
            shutdown,
            subscriptions: Arc::default(),
        }
    }

    /// Takes one of the caller's subscription slots, held until the stream is dropped.
    fn subscription_slot(&self, caller: &Caller) -> Result<SubscriptionSlot, Status> {
        let mut counts = self
            .subscriptions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = counts.entry(caller.workload_id.clone()).or_default();
        if *count >= MAX_SUBSCRIPTIONS_PER_CALLER {
            return Err(Error::ResourceExhausted(format!(
                "workload '{}' already holds {MAX_SUBSCRIPTIONS_PER_CALLER} revocation streams; \
                 close one first",
                caller.name
            ))
            .into());
        }
        *count += 1;
        Ok(SubscriptionSlot {
            counts: self.subscriptions.clone(),
            workload_id: caller.workload_id.clone(),
        })
    }
}

/// One open revocation stream of a workload; gives its slot back when dropped.
struct SubscriptionSlot {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    workload_id: String,
}

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = counts.get_mut(&self.workload_id) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.workload_id);
            }
        }
    }
}

type RevocationStream =
    Pin<Box<dyn Stream<Item = Result<proto::WatchRevocationsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl proto::tokens_server::Tokens for TokensService {
    async fn introspect(
        &self,
        request: Request<proto::IntrospectRequest>,
    ) -> Result<Response<proto::IntrospectResponse>, Status> {
        let caller = authorize(self.broker.credentials(), &request, Rpc::Introspect).await?;
        let message = request.into_inner();
        let introspection = Introspection {
            token: &message.token,
            audience: &message.audience,
            client_certificate_thumbprint: Some(message.client_certificate_thumbprint.as_str())
                .filter(|t| !t.is_empty()),
            intended_use: IntendedUse::parse(&message.action, &message.resource)?,
        };
        let response = match self.broker.introspect(&caller, &introspection).await? {
            Err(reason) => proto::IntrospectResponse {
                reason: reason.unwrap_or_default(),
                ..Default::default()
            },
            Ok(ActiveToken { claims, uses }) => proto::IntrospectResponse {
                active: true,
                scope: claims.scope,
                client_id: claims.client_id,
                sub: claims.sub,
                aud: claims.aud,
                iss: claims.iss,
                exp: claims.exp,
                iat: claims.iat,
                nbf: claims.nbf,
                jti: claims.jti,
                task_id: claims.task_id,
                token_type: "Bearer".into(),
                cnf_x5t_s256: claims.cnf.map(|cnf| cnf.x5t_s256).unwrap_or_default(),
                tool: claims.tool.unwrap_or_default(),
                arguments_digest: claims.arguments_digest.unwrap_or_default(),
                reason: String::new(),
                uses: uses.unwrap_or(0),
            },
        };
        Ok(Response::new(response))
    }

    async fn get_jwks(
        &self,
        _request: Request<proto::GetJwksRequest>,
    ) -> Result<Response<proto::GetJwksResponse>, Status> {
        let keys = self
            .broker
            .keyring()
            .jwks(UnixMillis::now())
            .into_iter()
            .map(proto::Jwk::from)
            .collect();
        Ok(Response::new(proto::GetJwksResponse {
            keys,
            issuer: self.broker.settings().issuer.clone(),
        }))
    }

    type WatchRevocationsStream = RevocationStream;

    async fn watch_revocations(
        &self,
        request: Request<proto::WatchRevocationsRequest>,
    ) -> Result<Response<RevocationStream>, Status> {
        let caller = authorize(self.broker.credentials(), &request, Rpc::WatchRevocations).await?;
        let slot = self.subscription_slot(&caller)?;
        // An admin follows every revocation; a resource server only those of its audiences
        // (lease events: task-level events name no audience, and each lease a task held has
        // its own event).
        let audiences = (!caller.roles.contains(&Role::Admin)).then_some(caller.audiences);
        let cursor = request.get_ref().cursor;
        let feed = self.broker.feed();
        let heartbeat_interval_ms =
            u32::try_from(feed.heartbeat_interval().as_millis()).unwrap_or(u32::MAX);
        let batches = feed.subscribe(cursor, self.shutdown.clone());
        let stream = ReceiverStream::new(batches).map(move |batch| {
            let _held_while_streaming = &slot;
            let batch = batch.map_err(Status::from)?;
            let concerns_caller = |record: &crate::store::FeedRecord| match &audiences {
                None => true,
                Some(served) => record
                    .event
                    .audience
                    .as_ref()
                    .is_some_and(|audience| served.contains(audience)),
            };
            Ok(proto::WatchRevocationsResponse {
                events: batch
                    .records
                    .into_iter()
                    .filter(concerns_caller)
                    .map(revocation_event)
                    .collect(),
                cursor: batch.cursor,
                caught_up: batch.caught_up,
                heartbeat_interval_ms,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

fn revocation_event(record: crate::store::FeedRecord) -> proto::RevocationEvent {
    let event = record.event;
    proto::RevocationEvent {
        cursor: record.cursor,
        lease_id: event.lease_id.unwrap_or_default(),
        task_id: event.task_id,
        scope: event.scope.unwrap_or_default(),
        audience: event.audience.unwrap_or_default(),
        reason: convert::revocation_reason(event.reason).into(),
        not_after: Some(convert::timestamp(event.not_after)),
        occurred_at: Some(convert::timestamp(event.occurred_at)),
    }
}
