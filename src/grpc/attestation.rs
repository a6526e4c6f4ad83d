//! The `Attestation` service: a workload proves what it is and receives an X.509-SVID.

use std::sync::Arc;

use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::access::Rpc;
use super::auth::authorize;
use crate::broker::Broker;
use crate::error::Error;
use crate::identity::pem::{key_to_pem, to_pem};
use crate::identity::{IssuedSvid, selectors};
use crate::proto;
use crate::proto::attest_request::Method;

pub struct AttestationService {
    broker: Arc<Broker>,
}

impl AttestationService {
    pub fn new(broker: Arc<Broker>) -> Self {
        AttestationService { broker }
    }

    fn svid(&self, svid: IssuedSvid) -> proto::X509Svid {
        proto::X509Svid {
            spiffe_id: svid.spiffe_id.as_str().to_owned(),
            // The leaf first, then its chain: what a client presents as its certificate.
            certificate_pem: std::iter::once(&svid.certificate)
                .chain(&svid.chain)
                .map(|der| to_pem(der))
                .collect(),
            private_key_pem: key_to_pem(&svid.private_key),
            bundle_pem: self.broker.ca().trust_bundle().pem().to_owned(),
            expires_at: svid.expires_at.as_seconds(),
            thumbprint: svid.thumbprint,
        }
    }
}

#[tonic::async_trait]
impl proto::attestation_server::Attestation for AttestationService {
    async fn attest(
        &self,
        request: Request<proto::AttestRequest>,
    ) -> Result<Response<proto::AttestResponse>, Status> {
        let local_peer = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        let peer = match (local_peer, request.remote_addr()) {
            (Some(local), _) => format!("uid:{}", local.uid()),
            (None, Some(address)) => format!("ip:{}", address.ip()),
            (None, None) => "unknown".to_owned(),
        };
        let _admitted = self.broker.admit_attestation(&peer)?;
        let svid = match &request.get_ref().method {
            Some(Method::JoinToken(token)) => self.broker.attest_with_join_token(token).await?,
            Some(Method::Jwt(token)) => self.broker.attest_with_jwt(token).await?,
            Some(Method::Unix(_)) => {
                let peer = local_peer.ok_or_else(|| {
                    Error::Unauthenticated(
                        "unix: attestation by Unix identity works only on the broker's \
                             local Unix socket (server.unix_socket)"
                            .into(),
                    )
                })?;
                let observed = selectors::unix(peer.uid(), peer.gid(), peer.pid());
                self.broker.attest_unix(&observed).await?
            }
            None => {
                return Err(Error::invalid(
                    "method",
                    "name an attestation method: join_token, jwt or unix",
                )
                .into());
            }
        };
        Ok(Response::new(proto::AttestResponse {
            svid: Some(self.svid(svid)),
        }))
    }

    async fn renew_svid(
        &self,
        request: Request<proto::RenewSvidRequest>,
    ) -> Result<Response<proto::RenewSvidResponse>, Status> {
        let caller = authorize(self.broker.credentials(), &request, Rpc::RenewSvid).await?;
        let svid = self.broker.renew_svid(&caller).await?;
        Ok(Response::new(proto::RenewSvidResponse {
            svid: Some(self.svid(svid)),
        }))
    }
}
