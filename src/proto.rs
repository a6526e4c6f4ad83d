#![allow(clippy::all, missing_docs)]
//! Code generated from `proto/warrant/v1` and `proto/spiffe` by build.rs.

tonic::include_proto!("warrant.v1");

/// The SPIFFE Workload API (`proto/spiffe/workload.proto`, which has no package).
pub mod spiffe_workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));

    use super::redacted;

    impl std::fmt::Debug for X509svid {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("X509svid")
                .field("spiffe_id", &self.spiffe_id)
                .field("x509_svid_bytes", &self.x509_svid.len())
                .field("x509_svid_key", &redacted(&self.x509_svid_key))
                .field("bundle_bytes", &self.bundle.len())
                .field("hint", &self.hint)
                .finish()
        }
    }

    impl std::fmt::Debug for Jwtsvid {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Jwtsvid")
                .field("spiffe_id", &self.spiffe_id)
                .field("svid", &redacted(&self.svid))
                .field("hint", &self.hint)
                .finish()
        }
    }

    impl std::fmt::Debug for ValidateJwtsvidRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ValidateJwtsvidRequest")
                .field("audience", &self.audience)
                .field("svid", &redacted(&self.svid))
                .finish()
        }
    }
}

/// The encoded descriptor set of `warrant.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/warrant_descriptor.bin"));

impl From<crate::issuer::Jwk> for Jwk {
    fn from(jwk: crate::issuer::Jwk) -> Self {
        Jwk {
            kty: jwk.kty,
            crv: jwk.crv,
            x: jwk.x,
            y: jwk.y.unwrap_or_default(),
            kid: jwk.kid,
            alg: jwk.alg,
            r#use: jwk.key_use,
        }
    }
}

impl From<Jwk> for crate::issuer::Jwk {
    fn from(jwk: Jwk) -> Self {
        crate::issuer::Jwk {
            kty: jwk.kty,
            crv: jwk.crv,
            x: jwk.x,
            y: Some(jwk.y).filter(|y| !y.is_empty()),
            kid: jwk.kid,
            alg: jwk.alg,
            key_use: jwk.r#use,
        }
    }
}

/// Stands in for a secret in `Debug` output: says whether one is there, never what it is.
fn redacted(secret: impl AsRef<[u8]>) -> &'static str {
    if secret.as_ref().is_empty() {
        ""
    } else {
        "[redacted]"
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("lease_id", &self.lease_id)
            .field("scope", &self.scope)
            .field("kind", &self.kind())
            .field("state", &self.state())
            .field("audience", &self.audience)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("credential", &redacted(&self.credential))
            .finish()
    }
}

impl std::fmt::Debug for CreateWorkloadResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateWorkloadResponse")
            .field("workload", &self.workload)
            .field("credential", &redacted(&self.credential))
            .finish()
    }
}

impl std::fmt::Debug for RotateWorkloadCredentialResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotateWorkloadCredentialResponse")
            .field("workload", &self.workload)
            .field("credential", &redacted(&self.credential))
            .finish()
    }
}

impl std::fmt::Debug for IntrospectRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntrospectRequest")
            .field("token", &redacted(&self.token))
            .field("audience", &self.audience)
            .field(
                "client_certificate_thumbprint",
                &self.client_certificate_thumbprint,
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_of_secret_bearing_messages_hides_the_secret() {
        let secret = "eyJhbGciOiJFZERTQSJ9.c2VjcmV0.c2ln";
        let lease = Lease {
            lease_id: "lease_1".into(),
            credential: secret.into(),
            ..Default::default()
        };
        let printed = [
            format!("{lease:?}"),
            format!(
                "{:?}",
                BeginTaskResponse {
                    leases: vec![lease.clone()],
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                CreateWorkloadResponse {
                    credential: secret.into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                RotateWorkloadCredentialResponse {
                    credential: secret.into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                IntrospectRequest {
                    token: secret.into(),
                    audience: "https://crm.test".into(),
                    ..Default::default()
                }
            ),
        ];
        for text in printed {
            assert!(!text.contains("c2VjcmV0"), "{text}");
            assert!(text.contains("[redacted]"), "{text}");
        }
        assert!(format!("{lease:?}").contains("lease_1"));
    }
}

impl std::fmt::Debug for AttestRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttestRequest")
            .field("method", &self.method)
            .finish()
    }
}

impl std::fmt::Debug for attest_request::Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            attest_request::Method::JoinToken(token) => {
                f.debug_tuple("JoinToken").field(&redacted(token)).finish()
            }
            attest_request::Method::Unix(unix) => f.debug_tuple("Unix").field(unix).finish(),
            attest_request::Method::Jwt(token) => {
                f.debug_tuple("Jwt").field(&redacted(token)).finish()
            }
        }
    }
}

impl std::fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("certificate_pem", &self.certificate_pem)
            .field("private_key_pem", &redacted(&self.private_key_pem))
            .field("bundle_pem", &self.bundle_pem)
            .field("expires_at", &self.expires_at)
            .field("thumbprint", &self.thumbprint)
            .finish()
    }
}

impl std::fmt::Debug for CreateJoinTokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateJoinTokenResponse")
            .field("join_token", &redacted(&self.join_token))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}
