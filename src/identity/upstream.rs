//! An intermediate CA given in the configuration (`[identity.upstream_ca]`): the
//! organisation's PKI signs Warrant's CA certificate, so SVIDs chain to the organisation's
//! roots and the trust bundle is those roots. Everything is checked at start, so a broker never
//! serves SVIDs that its own trust bundle would refuse: the certificate is a CA and valid now,
//! the key is its key, and a leaf it signs chains to a root of the bundle.

use std::sync::Arc;

use rcgen::{Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::trust_bundle::{LoadedCa, jwk_of_certificate};
use crate::config::UpstreamCaFiles;
use crate::domain::UnixMillis;

/// The id the upstream CA has in logs and audit events.
const UPSTREAM_CA_ID: &str = "upstream";

/// Why the configured intermediate CA cannot be used; names the setting to fix.
#[derive(Debug, thiserror::Error)]
#[error("identity.upstream_ca.{field}: {message}")]
pub struct UpstreamCaError {
    pub field: &'static str,
    pub message: String,
}

pub(super) fn refused(field: &'static str, message: impl Into<String>) -> UpstreamCaError {
    UpstreamCaError {
        field,
        message: message.into(),
    }
}

/// The signing CA (with the certificates sent after each leaf: `cert_file`'s chain) and the
/// roots of the bundle, read from `files`.
pub fn load(files: &UpstreamCaFiles) -> Result<(LoadedCa, Vec<Vec<u8>>), UpstreamCaError> {
    let chain = certificates("cert_file", &files.cert_pem)?;
    let roots = certificates("bundle_file", &files.bundle_pem)?;
    let signing = parse("cert_file", &chain[0])?;
    if !signing.is_ca() {
        return Err(refused(
            "cert_file",
            "the first certificate is not a CA (basicConstraints cA is not set)",
        ));
    }
    let validity = signing.validity();
    if !validity.is_valid() {
        return Err(refused(
            "cert_file",
            "the CA certificate is not valid now (expired or not yet valid)",
        ));
    }
    let expires_at = UnixMillis(validity.not_after.timestamp().saturating_mul(1000));
    let key_pem =
        std::str::from_utf8(&files.key_pem).map_err(|_| refused("key_file", "not PEM text"))?;
    let key = KeyPair::from_pem(key_pem).map_err(|error| {
        refused(
            "key_file",
            format!("not a PKCS#8 private key Warrant can sign with: {error}"),
        )
    })?;
    if key.public_key_raw() != signing.public_key().subject_public_key.data.as_ref() {
        return Err(refused(
            "key_file",
            "the key is not the key of the CA certificate in cert_file",
        ));
    }
    for (index, root) in roots.iter().enumerate() {
        if !parse("bundle_file", root)?.is_ca() {
            return Err(refused(
                "bundle_file",
                format!("certificate {} is not a CA", index + 1),
            ));
        }
        if jwk_of_certificate(root).is_none() {
            return Err(refused(
                "bundle_file",
                format!(
                    "certificate {} has a key the SPIFFE bundle cannot carry (EC P-256 or \
                     P-384, or RSA)",
                    index + 1
                ),
            ));
        }
    }
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(chain[0].clone()), key)
        .map_err(|error| refused("cert_file", format!("cannot sign with it: {error}")))?;
    let signer = LoadedCa {
        id: UPSTREAM_CA_ID.to_owned(),
        certificate: chain[0].clone(),
        chain,
        expires_at,
        activated_at: UnixMillis(0),
        publish_until: None,
        issuer,
    };
    Ok((signer, roots))
}

/// Checks that `leaf` (signed by the upstream CA) chains through `chain` to one of `roots`,
/// as the mTLS listener will check the SVIDs.
pub fn check_chain(
    leaf: &[u8],
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
) -> Result<(), UpstreamCaError> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store
            .add(CertificateDer::from(root.clone()))
            .map_err(|error| refused("bundle_file", error.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
        .build()
        .map_err(|error| refused("bundle_file", error.to_string()))?;
    let intermediates: Vec<_> = chain
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    verifier
        .verify_client_cert(
            &CertificateDer::from(leaf.to_vec()),
            &intermediates,
            UnixTime::now(),
        )
        .map(drop)
        .map_err(|error| {
            refused(
                "bundle_file",
                format!("an SVID signed by cert_file's CA does not chain to these roots: {error}"),
            )
        })
}

/// The certificates (DER) of a PEM file; at least one.
fn certificates(field: &'static str, pem: &[u8]) -> Result<Vec<Vec<u8>>, UpstreamCaError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .map(|certificate| certificate.map(|der| der.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| refused(field, format!("not PEM certificates: {error}")))?;
    if certificates.is_empty() {
        return Err(refused(field, "no certificate in the file"));
    }
    Ok(certificates)
}

fn parse<'a>(field: &'static str, der: &'a [u8]) -> Result<X509Certificate<'a>, UpstreamCaError> {
    X509Certificate::from_der(der)
        .map(|(_, certificate)| certificate)
        .map_err(|error| refused(field, format!("not an X.509 certificate: {error}")))
}
