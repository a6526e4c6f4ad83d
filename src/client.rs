//! Connecting to a broker: a channel (TLS when the address is `https://`) and clients that send
//! the workload credential on every call. Used by the CLI, the verifier and the tests.

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::admin_client::AdminClient;
use crate::proto::approvals_client::ApprovalsClient;
use crate::proto::attestation_client::AttestationClient;
use crate::proto::tasks_client::TasksClient;
use crate::proto::tokens_client::TokensClient;

/// How often an idle connection pings the broker, and how long it waits for the answer before
/// it treats the connection as dead: a stopped broker or a half-open connection ends the calls
/// on it (a revocation feed then reconnects) instead of leaving them waiting forever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A failure to reach a broker.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid broker address {0:?}")]
    Address(String),
    #[error("the credential is not valid header text")]
    Credential,
    #[error("cannot connect to the broker at {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
}

/// Adds `authorization: Bearer <credential>` to each call (nothing when there is none).
#[derive(Clone)]
pub struct BearerAuth(Option<MetadataValue<Ascii>>);

impl BearerAuth {
    pub fn new(credential: Option<&str>) -> Result<Self, ClientError> {
        credential
            .map(|credential| {
                let mut value: MetadataValue<Ascii> = format!("Bearer {credential}")
                    .parse()
                    .map_err(|_| ClientError::Credential)?;
                // Marked sensitive, so HTTP/2 never puts it in a compression table and
                // `Debug` of the request shows no credential.
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()
            .map(BearerAuth)
    }
}

impl Interceptor for BearerAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client certificate and its key (PEM), such as an X.509-SVID from attestation.
#[derive(Clone)]
pub struct ClientIdentity {
    pub certificate_pem: Vec<u8>,
    pub private_key_pem: Vec<u8>,
}

/// A channel with credentials, from which service clients are made.
#[derive(Clone)]
pub struct Connection {
    channel: Channel,
    auth: BearerAuth,
}

pub type Authenticated = InterceptedService<Channel, BearerAuth>;

impl Connection {
    /// Connects to `address` (`http://host:port` or `https://host:port`); `ca_pem` is the CA
    /// that signed the broker's certificate, for `https://`.
    pub async fn open(
        address: &str,
        credential: Option<&str>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ClientError> {
        Self::open_as(address, credential, ca_pem, None).await
    }

    /// [`Connection::open`], presenting `identity` (an X.509-SVID) as TLS client certificate
    /// on an `https://` address.
    pub async fn open_as(
        address: &str,
        credential: Option<&str>,
        ca_pem: Option<&[u8]>,
        identity: Option<&ClientIdentity>,
    ) -> Result<Self, ClientError> {
        let mut endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|_| ClientError::Address(address.into()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if address.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some(identity) = identity {
                tls = tls.identity(Identity::from_pem(
                    &identity.certificate_pem,
                    &identity.private_key_pem,
                ));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|source| ClientError::Connect {
                    address: address.into(),
                    source,
                })?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                address: address.into(),
                source,
            })?;
        Ok(Connection {
            channel,
            auth: BearerAuth::new(credential)?,
        })
    }

    /// Connects to the broker's local Unix socket at `path` (attestation by Unix identity).
    pub async fn open_unix(path: &std::path::Path) -> Result<Self, ClientError> {
        let path = path.to_owned();
        let shown = path.display().to_string();
        // The URI is required by the API but unused: every connection goes to the socket.
        let channel = Endpoint::from_static("http://localhost")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|source| ClientError::Connect {
                address: shown,
                source,
            })?;
        Ok(Connection {
            channel,
            auth: BearerAuth::new(None)?,
        })
    }

    /// The underlying channel, for clients of other services (such as health checks).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn tasks(&self) -> TasksClient<Authenticated> {
        TasksClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn tokens(&self) -> TokensClient<Authenticated> {
        TokensClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn approvals(&self) -> ApprovalsClient<Authenticated> {
        ApprovalsClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn admin(&self) -> AdminClient<Authenticated> {
        AdminClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn attestation(&self) -> AttestationClient<Authenticated> {
        AttestationClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }
}
