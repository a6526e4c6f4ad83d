//! Integration tests: real brokers on random ports, driven over gRPC and HTTP.
//! Behaviours that touch storage run on SQLite and on PostgreSQL (`backend_tests!`); the
//! PostgreSQL copies are ignored, and reported as such, unless WARRANT_TEST_DATABASE_URL is set.

/// Instantiates each listed `async fn name(backend: Backend)` once per storage backend.
macro_rules! backend_tests {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(not(warrant_postgres_tests), ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests")]
                async fn $name() {
                    super::$name($crate::support::Backend::Postgres).await
                }
            )+
        }
    };
}

mod support;

mod access;
mod api_keys;
mod approvals;
mod audit;
mod auth;
mod authzen;
mod ca_rotation;
mod conformance;
mod entries;
mod feed_silence;
mod identity;
mod interop;
mod jobs;
mod jwt_attestation;
mod lifecycle;
mod limits;
mod lossy_fs;
mod metrics;
mod policy;
mod power_loss;
mod process;
mod revocation_scopes;
mod rotation;
mod tasks;
mod token_use;
mod tokens;
mod tool_calls;
mod upstream_ca;
mod verifier;
mod webhook;
mod workload_api;
