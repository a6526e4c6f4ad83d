//! Builds the whole broker from a [`Config`]: binds the listeners first (so tests can ask for
//! port 0 and read the real address), opens the store, loads keys and catalog, then serves gRPC
//! and HTTP until a shutdown future resolves, and drains.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::bootstrap::{self, CatalogLoadError};
use crate::broker::{Broker, BrokerSettings, GrantRules};
use crate::config::{Config, TlsIdentity};
use crate::identity::jwt_attestor::JwtAttestor;
use crate::identity::jwt_svid::JwtSvidKey;
use crate::identity::{Ca, IdentityAuthority};
use crate::issuer::master_key::MasterKeyError;
use crate::issuer::{BearerCredential, Keyring};
use crate::jobs::Handlers;
use crate::metrics::Metrics;
use crate::store::StoreError;
use crate::{audit, grpc, http, jobs, reaper};

/// How often the server pings an idle client connection, and how long it waits for the answer
/// before closing it: a vanished client does not keep its streams (and their feed readers).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls one HTTP/2 connection may have open at once; beyond, the client's new streams are
/// refused, so one connection cannot hold unbounded broker memory.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// The largest block of request headers (a bearer credential is under 100 bytes).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// A call not answered by then fails with CANCELLED; a stream's messages are not bounded by it
/// (only the wait for its first answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How soon after commit an audit event is chained.
const AUDIT_SEAL_INTERVAL: Duration = Duration::from_millis(200);

/// Why the broker could not start. [`StartError::exit_code`] maps each to a process exit code.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Catalog(#[from] CatalogLoadError),
    #[error(transparent)]
    Policy(#[from] bootstrap::PolicyLoadError),
    #[error(transparent)]
    MasterKey(#[from] MasterKeyError),
    #[error(transparent)]
    Jwks(#[from] crate::identity::jwt_attestor::JwksError),
    #[error(transparent)]
    UpstreamCa(#[from] crate::identity::upstream::UpstreamCaError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    Tls(String),
    #[error("approvals.webhook_ca_file: {0}")]
    Webhook(String),
    #[error("server.unix_socket {path}: {source}")]
    Unix {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("start-up failed: {0}")]
    Broker(#[from] crate::error::Error),
    #[error("server failed: {0}")]
    Serve(String),
}

impl StartError {
    /// 64 for configuration the operator must fix (as sysexits' EX_USAGE), 69 when a needed
    /// service is unavailable, 70 for anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_)
            | StartError::Webhook(_)
            | StartError::Catalog(_)
            | StartError::Policy(_)
            | StartError::MasterKey(_)
            | StartError::Jwks(_)
            | StartError::UpstreamCa(_)
            | StartError::Tls(_) => 64,
            StartError::Bind { .. } | StartError::Unix { .. } | StartError::Store(_) => 69,
            StartError::Broker(_) | StartError::Serve(_) => 70,
        }
    }
}

/// A broker that is bound and ready to run.
pub struct App {
    broker: Arc<Broker>,
    grpc_listener: TcpListener,
    /// The local socket for attestation by Unix identity, with its path.
    unix_listener: Option<(UnixListener, PathBuf)>,
    http_listener: TcpListener,
    tls: Option<TlsIdentity>,
    first_admin_credential: Option<BearerCredential>,
    reaper_interval: Duration,
    audit_checkpoint_interval: Duration,
    drain_timeout: Duration,
    /// What the job runner runs.
    job_handlers: Handlers,
    /// SIGHUP, listened for from the start so that none arriving once the broker serves is
    /// taken for the default "terminate"; `None` if the signal cannot be listened for.
    hangups: Option<tokio::signal::unix::Signal>,
}

impl App {
    pub async fn build(config: Config) -> Result<App, StartError> {
        let master_key = Arc::new(bootstrap::master_key(&config.master_key)?);
        let catalog = bootstrap::catalog(&config.catalog_file, config.create_demo_catalog)?;
        let policy = bootstrap::policy(&config.policy, &catalog, config.create_default_policy)?;
        if let Some(tls) = &config.tls {
            server_tls_config(tls, None)?;
        }
        let job_handlers = job_handlers(&config)?;
        let grpc_listener = bind(config.grpc_addr).await?;
        let http_listener = bind(config.http_addr).await?;
        let http_addr = local_addr(&http_listener, config.http_addr)?;
        let issuer = config
            .issuer
            .clone()
            .unwrap_or_else(|| format!("http://{http_addr}"));

        let store = crate::store::open(&config.database_url, config.store).await?;
        // After the store: a second broker on the same SQLite file stops at its lock above,
        // before it could take the first one's socket.
        let unix_listener = match &config.unix_socket {
            Some(path) => Some((bind_unix(path)?, path.clone())),
            None => None,
        };
        let audit_key = master_key.audit_key();
        let jwt_svids =
            JwtSvidKey::load_or_create(store.as_ref(), &master_key, &config.trust_domain).await?;
        let ca = match &config.upstream_ca {
            None => {
                Ca::load_or_create(
                    store.as_ref(),
                    master_key.clone(),
                    &config.trust_domain,
                    jwt_svids,
                )
                .await?
            }
            Some(files) => {
                Ca::upstream(files, master_key.clone(), &config.trust_domain, jwt_svids)?
            }
        };
        let jwt_attestor = JwtAttestor::load(&config.jwt_issuers).await?;
        let keyring = Keyring::load(store.as_ref(), master_key, config.signing_algorithm).await?;
        let metrics = Arc::new(Metrics::new());
        let settings = BrokerSettings {
            issuer,
            trust_domain: config.trust_domain.clone(),
            max_task_ttl: config.max_task_ttl,
            feed_heartbeat_interval: config.feed_heartbeat_interval,
            caller_limits: config.caller_limits,
            svid_ttl: config.svid_ttl,
            bearer_credentials: config.bearer_credentials,
            approval_webhook: config.approval_webhook.is_some(),
        };
        let broker = Arc::new(Broker::new(
            store,
            audit_key,
            keyring,
            GrantRules { catalog, policy },
            IdentityAuthority { ca, jwt_attestor },
            settings,
            metrics,
        ));
        let first_admin_credential = bootstrap::first_admin(&broker).await?;
        // Whatever expired while the broker was down is reported before the first request.
        broker.expire_due().await?;
        Ok(App {
            broker,
            grpc_listener,
            unix_listener,
            http_listener,
            tls: config.tls,
            first_admin_credential,
            reaper_interval: config.reaper_interval,
            audit_checkpoint_interval: config.audit_checkpoint_interval,
            drain_timeout: config.drain_timeout,
            job_handlers,
            hangups: match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(signal) => Some(signal),
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGHUP; reload policy with `warrant admin reload-policy`");
                    None
                }
            },
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        // A bound TCP listener always has a local address.
        self.grpc_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The token issuer (`iss`).
    pub fn issuer(&self) -> &str {
        &self.broker.settings().issuer
    }

    /// The admin credential created on this start, if the store was fresh. Shown once.
    pub fn take_first_admin_credential(&mut self) -> Option<BearerCredential> {
        self.first_admin_credential.take()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight calls finish
    /// (streams are ended), stops the reaper and closes the store.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartError> {
        let (stop_sender, stop) = watch::channel(false);
        let (routes, health) = grpc::routes(self.broker.clone(), stop.clone())
            .await
            .map_err(|error| StartError::Serve(error.to_string()))?;
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
            .timeout(REQUEST_TIMEOUT);
        // Observation outside admission, so refused calls are observed too.
        let layers = tower::ServiceBuilder::new()
            .layer(grpc::ObserveLayer::new(self.broker.clone()))
            .layer(grpc::AdmissionLayer::new(self.broker.clone()));
        let router = server.layer(layers).add_routes(routes);
        let connections =
            grpc::incoming::limited(self.grpc_listener, grpc::incoming::MAX_GRPC_CONNECTIONS);
        let grpc_stopped = |mut stop: watch::Receiver<bool>| async move {
            let _ = stop.wait_for(|stopping| *stopping).await;
        };
        let grpc = match &self.tls {
            // Client certificates are optional at the handshake (a workload attests before it
            // holds an SVID); one presented must chain to the current trust bundle.
            Some(tls) => {
                let verifier = Arc::new(grpc::tls::BundleClientVerifier::new(
                    self.broker.clone(),
                    Arc::new(rustls::crypto::ring::default_provider()),
                ));
                let mut config = server_tls_config(tls, Some(verifier))?;
                config.alpn_protocols = vec![b"h2".to_vec()];
                let handshaken = grpc::tls::handshaken(
                    connections,
                    tokio_rustls::TlsAcceptor::from(Arc::new(config)),
                    self.broker.clone(),
                );
                tokio::spawn(
                    router.serve_with_incoming_shutdown(handshaken, grpc_stopped(stop.clone())),
                )
            }
            None => tokio::spawn(
                router.serve_with_incoming_shutdown(connections, grpc_stopped(stop.clone())),
            ),
        };
        let acceptor = match &self.tls {
            Some(tls) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                server_tls_config(tls, None)?,
            ))),
            None => None,
        };
        let http = tokio::spawn(http::serve(
            self.http_listener,
            http::router(self.broker.clone()),
            acceptor,
            stop.clone(),
            self.drain_timeout,
        ));
        let sealer = tokio::spawn(audit::sealer::run(
            self.broker.clone(),
            AUDIT_SEAL_INTERVAL,
            self.audit_checkpoint_interval,
            stop.clone(),
        ));
        let reaper = tokio::spawn(reaper::run(
            self.broker.clone(),
            self.reaper_interval,
            stop.clone(),
        ));
        if let Some(hangups) = self.hangups {
            tokio::spawn(reload_policy_on_hangup(
                hangups,
                self.broker.clone(),
                stop.clone(),
            ));
        }
        let job_runner = tokio::spawn(jobs::run(
            self.broker.store().clone(),
            self.job_handlers,
            stop.clone(),
        ));
        let local = self.unix_listener.map(|(listener, path)| {
            let mut local_stop = stop.clone();
            let served = tonic::transport::Server::builder()
                .timeout(REQUEST_TIMEOUT)
                .add_routes(grpc::local_routes(self.broker.clone(), stop))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async move {
                        let _ = local_stop.wait_for(|stopping| *stopping).await;
                    },
                );
            tokio::spawn(async move {
                if let Err(error) = served.await {
                    tracing::warn!(%error, "the local Unix socket stopped serving");
                }
                let _ = std::fs::remove_file(&path);
            })
        });

        shutdown.await;
        tracing::info!("shutting down: draining in-flight calls");
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let _ = stop_sender.send(true);
        let drained = tokio::time::timeout(self.drain_timeout, async {
            let grpc_result = grpc.await;
            let _ = http.await;
            let _ = reaper.await;
            let _ = sealer.await;
            let _ = job_runner.await;
            if let Some(local) = local {
                let _ = local.await;
            }
            grpc_result
        })
        .await;
        self.broker.store().close().await;
        match drained {
            Ok(Ok(Ok(()))) => {
                tracing::info!("stopped");
                Ok(())
            }
            Ok(Ok(Err(error))) => Err(StartError::Serve(error.to_string())),
            Ok(Err(join_error)) => Err(StartError::Serve(join_error.to_string())),
            Err(_) => {
                tracing::warn!("calls still running after the drain timeout were cut off");
                Ok(())
            }
        }
    }
}

/// Listens on the Unix socket `path`, replacing a socket file left by a broker that is gone
/// (a live one holds the data directory's lock, or its own socket path). Any local process may
/// connect: what it gets is decided by attestation.
fn bind_unix(path: &Path) -> Result<UnixListener, StartError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let failed = |source: std::io::Error| StartError::Unix {
        path: path.to_owned(),
        source,
    };
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            return Err(failed(std::io::Error::other(
                "exists and is not a socket; not replacing it",
            )));
        }
        std::fs::remove_file(path).map_err(failed)?;
    }
    let listener = UnixListener::bind(path).map_err(failed)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(failed)?;
    Ok(listener)
}

/// The handlers of the job kinds this broker runs from the store's durable queue. The queue
/// carries work that must happen eventually (revoking external credentials, delivering
/// webhooks); the features that make such work register their kinds here.
fn job_handlers(config: &Config) -> Result<Handlers, StartError> {
    let mut handlers = Handlers::default();
    if let Some(webhook) = &config.approval_webhook {
        let sender = crate::webhook::WebhookSender::new(webhook).map_err(StartError::Webhook)?;
        handlers.register(crate::webhook::APPROVAL_WEBHOOK_JOB, Arc::new(sender));
    }
    Ok(handlers)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })
}

/// The listeners' TLS: the configured server certificate, and `client_verifier` for client
/// certificates (none asked for without one); ALPN offers HTTP/2 and HTTP/1.1.
fn server_tls_config(
    tls: &TlsIdentity,
    client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<rustls::ServerConfig, StartError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| StartError::Tls(format!("tls.cert_file: {error}")))?;
    if certs.is_empty() {
        return Err(StartError::Tls(
            "tls.cert_file: no certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem)
        .map_err(|error| StartError::Tls(format!("tls.key_file: {error}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| StartError::Tls(error.to_string()))?;
    let config = match client_verifier {
        Some(verifier) => config.with_client_cert_verifier(verifier),
        None => config.with_no_client_auth(),
    };
    let mut config = config
        .with_single_cert(certs, key)
        .map_err(|error| StartError::Tls(format!("tls.key_file: {error}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Reloads the policy set on each SIGHUP until the broker stops, as `Admin.ReloadPolicy` does.
async fn reload_policy_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    broker: Arc<Broker>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = async { drop(stop.wait_for(|stopping| *stopping).await) } => return,
            received = hangups.recv() => {
                if received.is_none() {
                    return;
                }
                // The outcome is logged and audited by the broker.
                let _ = broker.reload_policy(crate::audit::SIGNAL).await;
            }
        }
    }
}
