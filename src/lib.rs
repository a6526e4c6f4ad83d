//! Warrant: a short-lived, task-scoped credential broker for AI agents.
//!
//! An agent opens a task and receives only the credentials that task needs, each with a short
//! lifetime; completing the task revokes all of them, and downstream APIs learn it through
//! introspection or the revocation feed. See `README.md` and `../shared/DESIGN.md`.
#![forbid(unsafe_code)]

/// Assembles the broker from a [`config::Config`], binds its listeners and runs it.
pub mod app;
/// The tamper-evident audit trail: events, sealing into a hash chain, checkpoints, verification.
pub mod audit;
/// First start: master key, signing key, admin workload and demo scope catalog.
pub mod bootstrap;
/// The broker's decisions: begin/complete tasks, grant, renew and revoke leases.
pub mod broker;
/// Per-caller rate and concurrency limits.
pub mod caller_limits;
/// The `warrant` command line.
pub mod cli;
/// Connecting to a broker as a gRPC client, with a workload credential.
pub mod client;
/// Configuration: dev defaults, file, environment, validated with field names.
pub mod config;
/// Plain domain types and rules, without I/O.
pub mod domain;
/// The error type and its one mapping to gRPC status codes.
pub mod error;
/// The revocation feed: announcing committed revocations to streaming subscribers.
pub mod feed;
/// gRPC services and caller authentication.
pub mod grpc;
/// HTTP endpoints: JWKS, OpenID discovery, introspection, AuthZEN, health.
pub mod http;
/// The broker's own outbound HTTPS requests: JWKS fetches, webhooks.
pub mod https_client;
/// Workload identity: the X.509 CA, SVIDs and join tokens.
pub mod identity;
/// Signing keys, the master key that seals them, and access-token minting and checking.
pub mod issuer;
/// Runs durable jobs from the store's queue, retrying failures with backoff.
pub mod jobs;
/// Prometheus metrics.
pub mod metrics;
/// Policy-as-code (Cedar): who may have what, and when operators must approve first.
pub mod policy;
/// Generated protobuf and gRPC code for `warrant.v1`.
pub mod proto;
/// Marks leases and tasks past their deadline as expired.
pub mod reaper;
/// Persistence on SQLite or PostgreSQL.
pub mod store;
/// Logging set-up.
pub mod telemetry;
/// Offline validation of Warrant tokens for downstream Rust APIs.
pub mod verifier;
/// The approval webhook: signed notifications of requests that wait, through the job queue.
pub mod webhook;
