//! The `Tokens` service: what downstream APIs call to validate credentials.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::access::Rpc;
use super::auth::authorize;
use super::convert;
use crate::broker::Broker;
use crate::domain::{Role, UnixMillis};
use crate::error::Error;
use crate::proto;

pub struct TokensService {
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
}

impl TokensService {
    pub fn new(broker: Arc<Broker>, shutdown: watch::Receiver<bool>) -> Self {
        TokensService { broker, shutdown }
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
        if message.audience.is_empty() {
            return Err(
                Error::invalid("audience", "is required: the audience your API serves").into(),
            );
        }
        if !caller.roles.contains(&Role::Admin) && !caller.serves(&message.audience) {
            return Err(Error::PermissionDenied(format!(
                "audience: workload '{}' does not serve this audience; a resource server may \
                 introspect only tokens of the audiences it was registered with",
                caller.name
            ))
            .into());
        }
        let response = match self
            .broker
            .introspect(&caller, &message.token, &message.audience)
            .await?
        {
            None => proto::IntrospectResponse::default(),
            Some(claims) => proto::IntrospectResponse {
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
            .map(|jwk| proto::Jwk {
                kty: jwk.kty,
                crv: jwk.crv,
                x: jwk.x,
                y: jwk.y.unwrap_or_default(),
                kid: jwk.kid,
                alg: jwk.alg,
                r#use: jwk.key_use,
            })
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
