//! The admission layer: authenticates a call once, before any handler runs, and admits it
//! under its caller's rate and concurrency limits ([`CallerLimits`]). The caller is the
//! X.509-SVID presented as TLS client certificate (refused at once if it is not a current one),
//! or else the bearer credential; a refused certificate or credential is audited (rate-limited).
//! The caller travels in the request's extensions, where
//! [`super::auth::authorize`] finds it. A call with neither passes untouched (health,
//! reflection, the JWKS and attestation need none); one with a bearer credential that does not
//! authenticate passes too, and its handler refuses it with the same error.
//!
//! [`CallerLimits`]: crate::caller_limits::CallerLimits

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use super::auth;
use crate::broker::Broker;
use crate::domain::Caller;
use crate::error::Error;

/// Wraps the gRPC services with [`Admission`].
#[derive(Clone)]
pub struct AdmissionLayer {
    broker: Arc<Broker>,
}

impl AdmissionLayer {
    pub fn new(broker: Arc<Broker>) -> Self {
        AdmissionLayer { broker }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            broker: self.broker.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    broker: Arc<Broker>,
}

impl<S, Body, ResponseBody> Service<http::Request<Body>> for Admission<S>
where
    S: Service<http::Request<Body>, Response = http::Response<ResponseBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    Body: Send + 'static,
    ResponseBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone is not ready yet; the one polled ready is taken for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let broker = self.broker.clone();
        Box::pin(async move {
            let certificate = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs)
                .and_then(|chain| chain.first().cloned());
            if let Some(certificate) = certificate {
                return match auth::authenticate_certificate(broker.credentials(), &certificate)
                    .await
                {
                    Ok(caller) => admit(&broker, caller, inner, request).await,
                    Err(error) => {
                        if matches!(error, Error::Unauthenticated(_)) {
                            broker
                                .record_failed_authentication(
                                    "x509_svid",
                                    "not_a_current_svid",
                                    peer_ip(&request),
                                )
                                .await;
                        }
                        Ok(tonic::Status::from(error).into_http())
                    }
                };
            }
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|value| value.to_str().unwrap_or_default().to_owned());
            let Some(header) = header else {
                return inner.call(request).await;
            };
            match auth::authenticate_header(broker.credentials(), Some(&header)).await {
                Ok(caller) => admit(&broker, caller, inner, request).await,
                Err(refusal) => {
                    refusal.audit(&broker, peer_ip(&request)).await;
                    // The handler refuses it with the same error.
                    inner.call(request).await
                }
            }
        })
    }
}

/// The IP address the call came from, over TLS or not.
fn peer_ip<Body>(request: &http::Request<Body>) -> Option<std::net::IpAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .map(TlsConnectInfo::get_ref)
        .or_else(|| extensions.get::<TcpConnectInfo>())
        .and_then(TcpConnectInfo::remote_addr)
        .map(|address| address.ip())
}

/// Runs the call as `caller` if its limits admit it; answers RESOURCE_EXHAUSTED otherwise.
async fn admit<S, Body, ResponseBody>(
    broker: &Broker,
    caller: Caller,
    mut inner: S,
    mut request: http::Request<Body>,
) -> Result<S::Response, S::Error>
where
    S: Service<http::Request<Body>, Response = http::Response<ResponseBody>>,
    ResponseBody: Default,
{
    let admitted = match broker.admit(&caller) {
        Ok(admitted) => admitted,
        Err(error) => return Ok(tonic::Status::from(error).into_http()),
    };
    request.extensions_mut().insert(caller);
    let response = inner.call(request).await;
    // A stream's share ends once its handler has answered; streams have their own cap.
    drop(admitted);
    response
}
