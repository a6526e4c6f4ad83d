//! Caller authentication, done once per call by the admission layer: the X.509-SVID a caller
//! presented as its TLS client certificate, or else `authorization: Bearer <workload
//! credential>` (unless bearer credentials are switched off).

use tonic::Request;

use super::CredentialCache;
use super::access::{self, Rpc};
use crate::broker::Broker;
use crate::domain::Caller;
use crate::error::{Error, Result};
use crate::issuer::BearerCredential;
use crate::issuer::credential::digests_match;
use crate::store::WorkloadRecord;

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
    Ok(authenticate_header(credentials, header).await?)
}

/// [`authorize`] for an `authorization` header that did not come through gRPC (the HTTP
/// introspection endpoint); a refused credential is audited, as the admission layer does.
pub async fn authorize_header(broker: &Broker, header: Option<&str>, rpc: Rpc) -> Result<Caller> {
    let caller = match authenticate_header(broker.credentials(), header).await {
        Ok(caller) => caller,
        Err(refusal) => {
            refusal.audit(broker, None).await;
            return Err(refusal.into());
        }
    };
    access::authorize(&caller, rpc)?;
    Ok(caller)
}

/// Why a bearer credential did not authenticate.
pub(super) enum BearerRefusal {
    Missing,
    SwitchedOff,
    Malformed,
    Unknown,
    /// The check itself failed (the store): not the caller's fault.
    Failed(Error),
}

impl BearerRefusal {
    /// Records the refusal of a presented credential from `peer` in the audit trail (nothing
    /// for no credential at all, or a failed check).
    pub(super) async fn audit(&self, broker: &Broker, peer: Option<std::net::IpAddr>) {
        if let Some(reason) = self.reason() {
            broker
                .record_failed_authentication("bearer", reason, peer)
                .await;
        }
    }

    /// The audit trail's reason for a refused credential; `None` for no credential at all or
    /// a failed check.
    fn reason(&self) -> Option<&'static str> {
        match self {
            BearerRefusal::Missing | BearerRefusal::Failed(_) => None,
            BearerRefusal::SwitchedOff => Some("bearer_credentials_switched_off"),
            BearerRefusal::Malformed => Some("malformed_credential"),
            BearerRefusal::Unknown => Some("unknown_or_revoked_credential"),
        }
    }
}

impl From<BearerRefusal> for Error {
    fn from(refusal: BearerRefusal) -> Error {
        let unauthenticated = |message: &str| Error::Unauthenticated(message.into());
        match refusal {
            BearerRefusal::Missing => {
                unauthenticated("missing 'authorization': send 'Bearer <workload credential>'")
            }
            BearerRefusal::SwitchedOff => unauthenticated(
                "authorization: bearer credentials are switched off here \
                 (identity.bearer_credentials = false); present your X.509-SVID over mTLS",
            ),
            BearerRefusal::Malformed => {
                unauthenticated("authorization: not a 'Bearer wrt_...' workload credential")
            }
            BearerRefusal::Unknown => {
                unauthenticated("authorization: unknown or revoked credential")
            }
            BearerRefusal::Failed(error) => error,
        }
    }
}

/// The workload behind an `authorization: Bearer <workload credential>` header value.
pub(super) async fn authenticate_header(
    credentials: &CredentialCache,
    header: Option<&str>,
) -> std::result::Result<Caller, BearerRefusal> {
    let header = header.ok_or(BearerRefusal::Missing)?;
    if !credentials.bearer_allowed() {
        return Err(BearerRefusal::SwitchedOff);
    }
    let presented = bearer_value(header)
        .and_then(|credential| BearerCredential::parse(credential.trim()))
        .ok_or(BearerRefusal::Malformed)?;
    let (stored_hash, workload) = credentials
        .find(&presented.id)
        .await
        .map_err(BearerRefusal::Failed)?
        .ok_or(BearerRefusal::Unknown)?;
    if !digests_match(&presented.secret_sha256, &stored_hash) {
        return Err(BearerRefusal::Unknown);
    }
    Ok(caller(workload, None))
}

/// The workload behind the X.509-SVID whose DER is `certificate`: the TLS handshake checked
/// its chain to Warrant's CA and its validity; this checks that Warrant issued it and has not
/// revoked it, and that it has not expired since the connection opened.
pub(super) async fn authenticate_certificate(
    credentials: &CredentialCache,
    certificate: &[u8],
) -> Result<Caller> {
    let thumbprint = crate::identity::thumbprint(certificate);
    let workload = credentials.find_svid(&thumbprint).await?.ok_or_else(|| {
        Error::Unauthenticated(
            "client certificate: not a current X.509-SVID of this broker (unknown, expired or \
             revoked)"
                .into(),
        )
    })?;
    Ok(caller(workload, Some(thumbprint)))
}

fn caller(workload: WorkloadRecord, certificate_thumbprint: Option<String>) -> Caller {
    tracing::Span::current().record("caller", workload.name.as_str());
    workload.into_caller(certificate_thumbprint)
}

/// The credential after the `Bearer` scheme, which RFC 7235 makes case-insensitive.
fn bearer_value(header: &str) -> Option<&str> {
    let (scheme, value) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(value)
}
