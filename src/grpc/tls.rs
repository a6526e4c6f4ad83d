//! TLS on the gRPC listener, done here rather than by tonic so that the client-certificate
//! check follows the trust bundle: a CA that a rotation adds is trusted from the moment the
//! broker loads it, and a retired one until it leaves the bundle. Handshakes run concurrently,
//! each with a deadline, so a slow client cannot hold up the others.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;

use super::incoming::LimitedConnection;
use crate::broker::Broker;

/// How long a client has to complete its TLS handshake (on the HTTP listener too).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Completed handshakes waiting for the server to take them.
const ACCEPTED_BUFFER: usize = 64;

/// Checks client certificates against the CA's current trust bundle. A certificate is
/// optional at the handshake (a workload attests before it holds an SVID); one presented must
/// chain to a CA of the bundle. Which SVIDs are still current (not revoked, entry not
/// deleted) is checked on every call by the admission layer.
pub struct BundleClientVerifier {
    broker: Arc<Broker>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The verifier for the bundle generation it was built from.
    built: Mutex<Option<(u64, Arc<dyn ClientCertVerifier>)>>,
}

impl BundleClientVerifier {
    pub fn new(broker: Arc<Broker>, provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        BundleClientVerifier {
            broker,
            provider,
            built: Mutex::new(None),
        }
    }

    /// The WebPKI verifier for the current bundle, built again only when the bundle changed.
    fn current(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let bundle = self.broker.ca().trust_bundle();
        let mut built = self
            .built
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((generation, verifier)) = built.as_ref()
            && *generation == bundle.generation()
        {
            return Ok(verifier.clone());
        }
        let mut roots = RootCertStore::empty();
        for certificate in bundle.certificates() {
            roots
                .add(CertificateDer::from(certificate.to_vec()))
                .map_err(|error| rustls::Error::General(format!("a bundle CA: {error}")))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|error| rustls::Error::General(error.to_string()))?;
        // A handshake that read an older bundle than the one cached uses it, without
        // replacing the newer one.
        if built
            .as_ref()
            .is_none_or(|(generation, _)| *generation < bundle.generation())
        {
            *built = Some((bundle.generation(), verifier.clone()));
        }
        Ok(verifier)
    }
}

impl fmt::Debug for BundleClientVerifier {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("BundleClientVerifier")
    }
}

impl ClientCertVerifier for BundleClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    /// No hints: they would pin the bundle of one moment into this verifier, and SVID holders
    /// have only the one certificate to offer anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The connections of `accepted` after their TLS handshake with `acceptor`; a failed or
/// timed-out handshake closes its connection and is logged, and one that refused the client's
/// certificate is audited through `broker`. Stops accepting once the server drops the stream.
pub fn handshaken(
    accepted: impl Stream<Item = std::io::Result<LimitedConnection>> + Send + 'static,
    acceptor: TlsAcceptor,
    broker: Arc<Broker>,
) -> impl Stream<Item = std::io::Result<TlsStream<LimitedConnection>>> {
    let (sender, receiver) = mpsc::channel(ACCEPTED_BUFFER);
    tokio::spawn(async move {
        let mut accepted = Box::pin(accepted);
        loop {
            let connection = tokio::select! {
                next = accepted.next() => match next {
                    Some(Ok(connection)) => connection,
                    Some(Err(error)) => {
                        tracing::debug!(%error, "accepting a gRPC connection failed");
                        continue;
                    }
                    None => return,
                },
                () = sender.closed() => return,
            };
            let (acceptor, sender, broker) = (acceptor.clone(), sender.clone(), broker.clone());
            tokio::spawn(async move {
                let peer = connection.connect_info().remote_addr();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(connection)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "a TLS handshake failed");
                        if let Some(reason) = refused_certificate(&error) {
                            broker
                                .record_failed_authentication(
                                    "x509_svid",
                                    reason,
                                    peer.map(|address| address.ip()),
                                )
                                .await;
                        }
                    }
                    Err(_) => tracing::debug!("a TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}

/// The audit reason when a handshake failed because the client's certificate was refused;
/// `None` for every other failure (a port scan, a plaintext client, a dropped connection).
fn refused_certificate(error: &std::io::Error) -> Option<&'static str> {
    use rustls::CertificateError;
    let rustls::Error::InvalidCertificate(refusal) = error.get_ref()?.downcast_ref()? else {
        return None;
    };
    Some(match refusal {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "certificate_expired"
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "certificate_not_yet_valid"
        }
        CertificateError::UnknownIssuer => "certificate_from_another_ca",
        CertificateError::BadSignature => "certificate_bad_signature",
        _ => "certificate_refused",
    })
}
