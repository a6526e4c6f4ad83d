//! HTTP endpoints beside gRPC: JWKS and OpenID discovery, so ordinary JWT libraries can validate
//! Warrant tokens, RFC 7662 introspection, so they can check revocation with a plain HTTP POST,
//! health probes, Prometheus metrics, and the tool-call decision as an AuthZEN endpoint. Served
//! over TLS when the broker has a TLS identity.

mod authzen;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::FormRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::broker::{ActiveToken, Broker, IntendedUse, Introspection};
use crate::domain::UnixMillis;
use crate::error::Error;
use crate::grpc::access::Rpc;
use crate::grpc::authorize_header;

/// Where RFC 7662 introspection is served (announced in the discovery document).
pub const INTROSPECTION_PATH: &str = "/oauth2/introspect";
/// The X.509 trust bundle: SPIFFE bundle format (a JWK Set), and PEM.
pub const TRUST_BUNDLE_PATH: &str = "/trust-bundle.json";
pub const TRUST_BUNDLE_PEM_PATH: &str = "/trust-bundle.pem";
/// How long a client may cache the JWKS; a verifier meeting an unknown kid refetches anyway.
const JWKS_MAX_AGE_SECONDS: u32 = 60;
/// A client that has not sent a request's headers within this is dropped (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Open HTTP connections at most; beyond, new connections are closed at once. The endpoints
/// are small and cacheable, so this bounds what idle or slow clients can hold.
pub const MAX_HTTP_CONNECTIONS: usize = 1024;

pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/.well-known/openid-configuration", get(discovery))
        .route(TRUST_BUNDLE_PATH, get(trust_bundle))
        .route(TRUST_BUNDLE_PEM_PATH, get(trust_bundle_pem))
        .route(INTROSPECTION_PATH, post(introspect))
        .route(authzen::CONFIGURATION_PATH, get(authzen::configuration))
        .route(
            authzen::EVALUATION_PATH,
            post(authzen::evaluation).layer(DefaultBodyLimit::max(authzen::MAX_BODY_BYTES)),
        )
        .route(
            authzen::EVALUATIONS_PATH,
            post(authzen::evaluations).layer(DefaultBodyLimit::max(authzen::MAX_BODY_BYTES)),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .route("/metrics", get(metrics))
        .with_state(broker)
}

async fn jwks(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    let keys = broker.keyring().jwks(UnixMillis::now());
    (
        [(
            header::CACHE_CONTROL,
            format!("public, max-age={JWKS_MAX_AGE_SECONDS}"),
        )],
        Json(serde_json::json!({ "keys": keys })),
    )
}

async fn trust_bundle(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    Json(broker.ca().trust_bundle().jwks().clone())
}

async fn trust_bundle_pem(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        broker.ca().trust_bundle().pem().to_owned(),
    )
}

async fn discovery(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    let issuer = &broker.settings().issuer;
    Json(serde_json::json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "introspection_endpoint": format!("{issuer}{INTROSPECTION_PATH}"),
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["EdDSA", "ES256"],
    }))
}

/// The fields of an RFC 7662 introspection request (form-encoded).
#[derive(serde::Deserialize)]
struct IntrospectionForm {
    token: String,
    /// The audience to check the token for; a resource server serving one audience may leave
    /// it out.
    audience: Option<String>,
    /// The `x5t#S256` of the client certificate the token came with, for certificate-bound
    /// tokens (RFC 8705).
    client_certificate_thumbprint: Option<String>,
    /// What the caller is about to do with the token, for the broker's `UseToken` policy, and
    /// on what (as in `Tokens.Introspect`).
    action: Option<String>,
    resource: Option<String>,
}

/// RFC 7662 over HTTP, with the same rules as `Tokens.Introspect`: a resource server's
/// credential (or an admin's) in `authorization: Bearer`, `active: false` for any token not
/// valid for the audience right now.
async fn introspect(
    State(broker): State<Arc<Broker>>,
    headers: axum::http::HeaderMap,
    form: Result<Form<IntrospectionForm>, FormRejection>,
) -> Response {
    let form = match form {
        Ok(Form(form)) => form,
        Err(rejection) => {
            return error_response(&Error::invalid("form", rejection.body_text()));
        }
    };
    let header = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or_default());
    let answer = async {
        let caller = authorize_header(&broker, header, Rpc::Introspect).await?;
        let _admitted = broker.admit(&caller)?;
        let audience = match (form.audience, caller.audiences.as_slice()) {
            (Some(audience), _) => audience,
            (None, [only]) => only.clone(),
            (None, _) => {
                return Err(Error::invalid(
                    "audience",
                    "is required unless the caller serves exactly one audience",
                ));
            }
        };
        let introspection = Introspection {
            token: &form.token,
            audience: &audience,
            client_certificate_thumbprint: form.client_certificate_thumbprint.as_deref(),
            intended_use: IntendedUse::parse(
                form.action.as_deref().unwrap_or_default(),
                form.resource.as_deref().unwrap_or_default(),
            )?,
        };
        // RFC 7662 names its members after the token's claims, so the claims are the answer;
        // an inactive answer says only why (an extension member).
        Ok(match broker.introspect(&caller, &introspection).await? {
            Ok(ActiveToken { claims, uses }) => {
                let mut body = match serde_json::to_value(claims) {
                    Ok(serde_json::Value::Object(body)) => body,
                    _ => return Err(Error::internal("claims do not serialize to an object")),
                };
                body.insert("active".into(), true.into());
                body.insert("token_type".into(), "Bearer".into());
                if let Some(uses) = uses {
                    body.insert("uses".into(), uses.into());
                }
                serde_json::Value::Object(body)
            }
            Err(None) => serde_json::json!({ "active": false }),
            Err(Some(reason)) => serde_json::json!({ "active": false, "reason": reason }),
        })
    };
    match answer.await {
        Ok(body) => ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response(),
        Err(error) => error_response(&error),
    }
}

/// The HTTP status of an error, and its RFC 6749 error code.
fn status_of(error: &Error) -> (StatusCode, &'static str) {
    match error {
        Error::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "invalid_client"),
        Error::PermissionDenied(_) => (StatusCode::FORBIDDEN, "access_denied"),
        Error::InvalidArgument { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
        Error::NotFound { .. } => (StatusCode::NOT_FOUND, "invalid_request"),
        Error::FailedPrecondition(_) => (StatusCode::CONFLICT, "invalid_request"),
        Error::ResourceExhausted(_) => (StatusCode::TOO_MANY_REQUESTS, "temporarily_unavailable"),
        Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    }
}

/// What a caller is told about an error: nothing about an internal one.
fn described(error: &Error) -> String {
    match status_of(error).0 {
        StatusCode::INTERNAL_SERVER_ERROR => "internal error".to_owned(),
        _ => error.to_string(),
    }
}

/// An error as RFC 6749 shapes it: a status, and `error` with `error_description`.
fn error_response(error: &Error) -> Response {
    let (status, code) = status_of(error);
    let mut response = (
        status,
        Json(serde_json::json!({ "error": code, "error_description": described(error) })),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

async fn metrics(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        broker.metrics().encode(),
    )
}

async fn readiness(State(broker): State<Arc<Broker>>) -> (StatusCode, &'static str) {
    if broker.store().ping().await {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n")
    }
}

/// Serves `router` on `listener` until `shutdown` turns true, then lets open connections finish
/// their requests (bounded by `drain_timeout`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                                Ok((stream, _)) => {
                    // Small responses must not wait for delayed ACKs.
                    let _ = stream.set_nodelay(true);
                    stream
                }
                Err(error) => {
                    tracing::warn!(%error, "HTTP accept failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|stopping| *stopping) => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = MAX_HTTP_CONNECTIONS,
                "HTTP connection limit reached; closing a new connection"
            );
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(stream, service, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(
                        crate::grpc::tls::HANDSHAKE_TIMEOUT,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => serve_connection(stream, service, watcher).await,
                        _ => tracing::debug!("TLS handshake failed or timed out"),
                    }
                }
            }
        });
    }
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after the drain timeout; closing them");
    }
}

/// Serves HTTP/1 or HTTP/2 on one accepted connection, under the graceful-shutdown `watcher`.
async fn serve_connection<Io>(
    io: Io,
    service: TowerToHyperService<Router>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%error, "HTTP connection ended with an error");
    }
}
