//! Caller authentication: `authorization: Bearer <workload credential>` on every call that needs
//! an identity, done once per call by the admission layer. Attestation will add
//! certificate-based identities beside this.

use tonic::Request;

use super::CredentialCache;
use super::access::{self, Rpc};
use crate::domain::Caller;
use crate::error::{Error, Result};
use crate::issuer::BearerCredential;
use crate::issuer::credential::digests_match;

/// The workload behind the request's bearer credential, if its roles allow `rpc`.
pub async fn authorize<T>(
    credentials: &CredentialCache,
    request: &Request<T>,
    rpc: Rpc,
) -> Result<Caller> {
    let caller = match request.extensions().get::<Caller>() {
        Some(admitted) => admitted.clone(),
        None => authenticate(credentials, request).await?,
    };
    access::authorize(&caller, rpc)?;
    Ok(caller)
}

/// The workload behind the request's bearer credential, for a call the admission layer did
/// not authenticate: it either had no credential or one that fails here again, with the error.
async fn authenticate<T>(credentials: &CredentialCache, request: &Request<T>) -> Result<Caller> {
    let header = request
        .metadata()
        .get("authorization")
        .map(|value| value.to_str().unwrap_or_default());
    authenticate_header(credentials, header).await
}

/// [`authorize`] for an `authorization` header that did not come through gRPC (the HTTP
/// introspection endpoint).
pub async fn authorize_header(
    credentials: &CredentialCache,
    header: Option<&str>,
    rpc: Rpc,
) -> Result<Caller> {
    let caller = authenticate_header(credentials, header).await?;
    access::authorize(&caller, rpc)?;
    Ok(caller)
}

/// The workload behind an `authorization: Bearer <workload credential>` header value.
pub(super) async fn authenticate_header(
    credentials: &CredentialCache,
    header: Option<&str>,
) -> Result<Caller> {
    let header = header.ok_or_else(|| {
        Error::Unauthenticated(
            "missing 'authorization': send 'Bearer <workload credential>'".into(),
        )
    })?;
    let presented = bearer_value(header)
        .and_then(|credential| BearerCredential::parse(credential.trim()))
        .ok_or_else(|| {
            Error::Unauthenticated(
                "authorization: not a 'Bearer wrt_...' workload credential".into(),
            )
        })?;
    let unknown = || Error::Unauthenticated("authorization: unknown or revoked credential".into());
    let (stored_hash, workload) = credentials.find(&presented.id).await?.ok_or_else(unknown)?;
    if !digests_match(&presented.secret_sha256, &stored_hash) {
        return Err(unknown());
    }
    tracing::Span::current().record("caller", workload.name.as_str());
    Ok(Caller {
        workload_id: workload.id,
        name: workload.name,
        spiffe_id: workload.spiffe_id,
        roles: workload.roles,
        audiences: workload.audiences,
        certificate_thumbprint: None,
    })
}

/// The credential after the `Bearer` scheme, which RFC 7235 makes case-insensitive.
fn bearer_value(header: &str) -> Option<&str> {
    let (scheme, value) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(value)
}
