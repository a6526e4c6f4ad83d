//! gRPC: one file per service, plus caller authentication and proto conversions. Each handler
//! authenticates, parses the request into domain values (errors name the field), calls the
//! broker, and converts the answer.

pub mod access;
mod admin;
mod admission;
mod approvals;
mod attestation;
mod auth;
mod convert;
mod credentials;
pub mod incoming;
mod observe;
mod tasks;
pub mod tls;
mod tokens;
mod workload_api;

use std::sync::Arc;

use tokio::sync::watch;
use tonic::service::Routes;

use crate::broker::Broker;
use crate::proto::admin_server::AdminServer;
use crate::proto::approvals_server::ApprovalsServer;
use crate::proto::attestation_server::AttestationServer;
use crate::proto::spiffe_workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::proto::tasks_server::TasksServer;
use crate::proto::tokens_server::TokensServer;
pub use admission::AdmissionLayer;
pub(crate) use auth::authorize_header;
pub use credentials::CredentialCache;
pub use observe::ObserveLayer;

/// Largest request message accepted, in bytes: tokens and requests are small.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What the local Unix socket serves: attestation (by the peer's Unix identity, or a join
/// token), the SPIFFE Workload API (by the peer's Unix identity) and health, nothing that
/// needs a credential. Streams end when `shutdown` turns true.
pub fn local_routes(broker: Arc<Broker>, shutdown: watch::Receiver<bool>) -> Routes {
    let (_, health_service) = tonic_health::server::health_reporter();
    Routes::new(health_service)
        .add_service(
            AttestationServer::new(attestation::AttestationService::new(broker.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            SpiffeWorkloadApiServer::new(workload_api::WorkloadApiService::new(broker, shutdown))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
}

/// The Warrant services, standard health and reflection, ready to serve.
/// Streams end when `shutdown` turns true, so a graceful stop does not wait on them.
pub async fn routes(
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
) -> Result<(Routes, tonic_health::server::HealthReporter), tonic_reflection::server::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<TasksServer<tasks::TasksService>>()
        .await;
    health_reporter
        .set_serving::<TokensServer<tokens::TokensService>>()
        .await;
    health_reporter
        .set_serving::<ApprovalsServer<approvals::ApprovalsService>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<admin::AdminService>>()
        .await;
    health_reporter
        .set_serving::<AttestationServer<attestation::AttestationService>>()
        .await;
    // Both reflection versions: Python's reflection clients, grpc-requests and older grpcurl
    // speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let routes = Routes::new(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(
            TasksServer::new(tasks::TasksService::new(broker.clone(), shutdown.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            ApprovalsServer::new(approvals::ApprovalsService::new(
                broker.clone(),
                shutdown.clone(),
            ))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            TokensServer::new(tokens::TokensService::new(broker.clone(), shutdown))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            AttestationServer::new(attestation::AttestationService::new(broker.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            AdminServer::new(admin::AdminService::new(broker))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        );
    Ok((routes, health_reporter))
}
