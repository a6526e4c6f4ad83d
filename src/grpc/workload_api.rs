//! The SPIFFE Workload API on the local Unix socket, so existing SPIFFE client libraries
//! (go-spiffe, py-spiffe, rust-spiffe) get and rotate their X.509-SVID, and get and check
//! JWT-SVIDs, from Warrant unchanged.
//! The caller is whoever the kernel says is on the other end of the socket: each SVID comes
//! from a fresh Unix attestation of that peer, so a deleted entry or a revoked identity gets
//! no further SVID on its open stream.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::broker::Broker;
use crate::domain::UnixMillis;
use crate::error::Error;
use crate::identity::trust_bundle::TrustBundle;
use crate::identity::{IssuedSvid, selectors};
use crate::proto::spiffe_workload as api;

/// The metadata every Workload API call carries, so that a browser or a proxy cannot be made
/// to call the API by accident (SPIFFE Workload API, "Transport").
const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Messages a stream buffers for a slow client before the next one waits.
const STREAM_BUFFER: usize = 2;

type Stream<T> = ReceiverStream<Result<T, Status>>;

pub struct WorkloadApiService {
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
}

impl WorkloadApiService {
    pub fn new(broker: Arc<Broker>, shutdown: watch::Receiver<bool>) -> Self {
        WorkloadApiService { broker, shutdown }
    }

    /// This trust domain as the specification keys its bundles.
    fn trust_domain_key(&self) -> String {
        format!("spiffe://{}", self.broker.settings().trust_domain.as_str())
    }

    /// A stream of `render(value)`, sent again each time `source` changes, that stays open
    /// (as clients expect of a bundle stream) until the client leaves or the broker stops.
    fn following<V, T>(
        &self,
        mut source: watch::Receiver<V>,
        render: impl Fn(&V) -> T + Send + 'static,
    ) -> Stream<T>
    where
        V: Send + Sync + 'static,
        T: Send + 'static,
    {
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut has_source = true;
            loop {
                let message = render(&source.borrow_and_update());
                if sender.send(Ok(message)).await.is_err() {
                    return;
                }
                loop {
                    tokio::select! {
                        changed = source.changed(), if has_source => match changed {
                            Ok(()) => break,
                            // A source that never changes again: hold the stream open.
                            Err(_) => has_source = false,
                        },
                        () = sender.closed() => return,
                        _ = shutdown.wait_for(|stopping| *stopping) => return,
                    }
                }
            }
        });
        ReceiverStream::new(receiver)
    }

    fn x509_response(&self, svid: &IssuedSvid) -> api::X509svidResponse {
        api::X509svidResponse {
            svids: vec![api::X509svid {
                spiffe_id: svid.spiffe_id.as_str().to_owned(),
                // The leaf first, then any intermediates, as the specification orders them.
                x509_svid: std::iter::once(&svid.certificate)
                    .chain(&svid.chain)
                    .flatten()
                    .copied()
                    .collect(),
                x509_svid_key: svid.private_key.clone(),
                bundle: self.broker.ca().trust_bundle().der().to_vec(),
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: Default::default(),
        }
    }
}

/// Checks the security header and admits the peer through the attestation limits; returns the
/// selectors the kernel gives for it.
fn local_peer<T>(broker: &Broker, request: &Request<T>) -> Result<Vec<String>, Status> {
    let has_header = request
        .metadata()
        .get(SECURITY_HEADER)
        .is_some_and(|value| value.as_bytes() == b"true");
    if !has_header {
        return Err(Status::invalid_argument(format!(
            "security header missing from request: send the metadata '{SECURITY_HEADER}: true'"
        )));
    }
    let peer = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .ok_or_else(|| Status::unauthenticated("the kernel gave no credentials for this peer"))?;
    broker.admit_attestation(&format!("uid:{}", peer.uid()))?;
    Ok(selectors::unix(peer.uid(), peer.gid(), peer.pid()))
}

/// A peer without an identity is refused with `PERMISSION_DENIED`, the code SPIFFE clients
/// read as "no identity (yet)" and retry on.
fn no_identity(error: Error) -> Status {
    match error {
        Error::Unauthenticated(reason) => Status::permission_denied(reason),
        other => other.into(),
    }
}

/// The shortest wait between two SVIDs on one stream, whatever their lifetimes say.
const MIN_REISSUE_INTERVAL: Duration = Duration::from_secs(1);

/// When to issue the next SVID: once half of this one's lifetime has passed, or a second after
/// a pending CA activates (so the next SVID is its), and never sooner than a second from now.
fn reissue_deadline(broker: &Broker, svid: &IssuedSvid) -> tokio::time::Instant {
    let now = UnixMillis::now();
    let half_life = svid.expires_at.0.saturating_sub(svid.issued_at.0) / 2;
    let mut due_at = svid.issued_at.0.saturating_add(half_life);
    if let Some(pending) = broker.ca().trust_bundle().pending(now) {
        due_at = due_at.min(pending.activated_at.0.saturating_add(1000));
    }
    let wait = Duration::from_millis(u64::try_from(due_at - now.0).unwrap_or_default());
    tokio::time::Instant::now() + wait.max(MIN_REISSUE_INTERVAL)
}

#[tonic::async_trait]
impl api::spiffe_workload_api_server::SpiffeWorkloadApi for WorkloadApiService {
    type FetchX509SVIDStream = Stream<api::X509svidResponse>;
    type FetchX509BundlesStream = Stream<api::X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<api::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<api::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let observed = local_peer(&self.broker, &request)?;
        let first = self
            .broker
            .attest_unix(&observed)
            .await
            .map_err(no_identity)?;
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let service = WorkloadApiService::new(self.broker.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            let mut shutdown = service.shutdown.clone();
            let mut bundle = service.broker.ca().watch_trust_bundle();
            let mut svid = first;
            loop {
                bundle.mark_unchanged();
                if sender.send(Ok(service.x509_response(&svid))).await.is_err() {
                    return;
                }
                // A fresh SVID at half-life, when a pending CA activates, or when a rotated
                // bundle has another signer; a bundle change alone sends this SVID again with
                // the new bundle.
                let is_due = tokio::select! {
                    () = tokio::time::sleep_until(reissue_deadline(&service.broker, &svid)) => true,
                    _ = bundle.changed() => {
                        let bundle = service.broker.ca().trust_bundle();
                        bundle.signer(UnixMillis::now()).id != svid.ca_id
                    }
                    () = sender.closed() => return,
                    _ = shutdown.wait_for(|stopping| *stopping) => return,
                };
                if !is_due {
                    continue;
                }
                svid = match service.broker.attest_unix(&observed).await {
                    Ok(svid) => svid,
                    Err(error) => {
                        let _ = sender.send(Err(no_identity(error))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<api::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        local_peer(&self.broker, &request)?;
        let trust_domain = self.trust_domain_key();
        let stream = self.following(
            self.broker.ca().watch_trust_bundle(),
            move |bundle: &Arc<TrustBundle>| api::X509BundlesResponse {
                crl: Vec::new(),
                bundles: [(trust_domain.clone(), bundle.der().to_vec())].into(),
            },
        );
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<api::JwtsvidRequest>,
    ) -> Result<Response<api::JwtsvidResponse>, Status> {
        let observed = local_peer(&self.broker, &request)?;
        let request = request.into_inner();
        if request.audience.is_empty() || request.audience.iter().any(String::is_empty) {
            return Err(Error::invalid("audience", "name at least one, none empty").into());
        }
        let requested = Some(request.spiffe_id.as_str()).filter(|id| !id.is_empty());
        let (spiffe_id, svid) = self
            .broker
            .issue_jwt_svid(&observed, &request.audience, requested)
            .await
            .map_err(no_identity)?;
        Ok(Response::new(api::JwtsvidResponse {
            svids: vec![api::Jwtsvid {
                spiffe_id: spiffe_id.as_str().to_owned(),
                svid,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<api::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        local_peer(&self.broker, &request)?;
        let jwks = self.broker.ca().jwt_svids().bundle_jwks().to_string();
        // The JWT-SVID key does not rotate yet: a source that never changes.
        let (_, unchanging) = watch::channel(jwks.into_bytes());
        let trust_domain = self.trust_domain_key();
        let stream = self.following(unchanging, move |jwks: &Vec<u8>| api::JwtBundlesResponse {
            bundles: [(trust_domain.clone(), jwks.clone())].into(),
        });
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<api::ValidateJwtsvidRequest>,
    ) -> Result<Response<api::ValidateJwtsvidResponse>, Status> {
        local_peer(&self.broker, &request)?;
        let request = request.into_inner();
        if request.audience.is_empty() {
            return Err(Error::invalid("audience", "required").into());
        }
        if request.svid.is_empty() {
            return Err(Error::invalid("svid", "required").into());
        }
        let (spiffe_id, claims) = self
            .broker
            .validate_jwt_svid(&request.svid, &request.audience)
            .await?;
        Ok(Response::new(api::ValidateJwtsvidResponse {
            spiffe_id: spiffe_id.as_str().to_owned(),
            claims: Some(to_struct(claims)),
        }))
    }
}

/// JSON claims as a protobuf `Struct`.
fn to_struct(object: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: object
            .into_iter()
            .map(|(name, value)| (name, to_value(value)))
            .collect(),
    }
}

fn to_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(flag) => Kind::BoolValue(flag),
        Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or_default()),
        Value::String(text) => Kind::StringValue(text),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        Value::Object(object) => Kind::StructValue(to_struct(object)),
    };
    prost_types::Value { kind: Some(kind) }
}
