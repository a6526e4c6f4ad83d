//! Warrant's X.509 CA: an ECDSA P-256 key generated on first start, sealed under the master key
//! in the store, and the X.509-SVIDs it signs. Leaves follow the SPIFFE X509-SVID rules:
//! exactly one URI SAN (the SPIFFE ID), an empty subject, `cA` false, the digital-signature key
//! usage only, client and server authentication, and a short lifetime.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::domain::{SpiffeId, TrustDomain, UnixMillis};
use crate::error::{Error, Result};
use crate::issuer::MasterKey;
use crate::issuer::random;
use crate::store::{Store, StoredCaKey};

use super::jwt_svid::JwtSvidKey;

/// The first CA's id: replicas starting together on one database all store this id, so the
/// first insert wins and every replica signs with the same key.
const FIRST_CA_ID: &str = "ca-1";
/// How long a self-generated CA certificate is valid.
const CA_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How often a bundle consumer should fetch the bundle again, in seconds.
const BUNDLE_REFRESH_HINT_SECONDS: u64 = 300;
/// A leaf is valid from a little before its issuance, for clocks slightly behind ours.
const BACKDATE: Duration = Duration::from_secs(30);

/// An X.509-SVID and its private key, as handed to its workload once.
pub struct IssuedSvid {
    pub spiffe_id: SpiffeId,
    /// The leaf, DER.
    pub certificate: Vec<u8>,
    /// PKCS#8 DER. `Debug` of the types carrying it never shows it.
    pub private_key: Vec<u8>,
    /// Base64url SHA-256 of the leaf's DER: its RFC 8705 `x5t#S256` thumbprint.
    pub thumbprint: String,
    /// Hex.
    pub serial: String,
    pub issued_at: UnixMillis,
    pub expires_at: UnixMillis,
}

/// The trust domain's authority: the CA that signs X.509-SVIDs, and the key that signs
/// JWT-SVIDs.
pub struct Ca {
    certificate: Vec<u8>,
    expires_at: UnixMillis,
    issuer: Issuer<'static, KeyPair>,
    jwt_svids: JwtSvidKey,
}

impl Ca {
    /// The stored CA, or a new one stored first (a fresh store).
    pub async fn load_or_create(
        store: &dyn Store,
        master_key: &MasterKey,
        trust_domain: &TrustDomain,
    ) -> Result<Ca> {
        let candidate = generate(master_key, trust_domain, UnixMillis::now())?;
        let stored = store.insert_ca_key(candidate).await?;
        let current = stored
            .into_iter()
            .next()
            .ok_or_else(|| Error::internal("no CA key after storing one"))?;
        let pkcs8 = master_key
            .open(&seal_context(&current.id), &current.sealed_private_key)
            .map_err(|error| Error::internal(format!("cannot open the CA key: {error}")))?;
        let key = KeyPair::try_from(pkcs8.as_slice())
            .map_err(|error| Error::internal(format!("the stored CA key is unusable: {error}")))?;
        Ok(Ca {
            issuer: Issuer::new(ca_params(&current.id, trust_domain), key),
            certificate: current.certificate,
            expires_at: current.expires_at,
            jwt_svids: JwtSvidKey::load_or_create(store, master_key, trust_domain).await?,
        })
    }

    /// A CA kept only in memory: the benchmark's reference for leaf signing, with the
    /// broker's own issuance code.
    pub fn in_memory(trust_domain: &TrustDomain) -> Result<Ca> {
        let (key, certificate, expires_at) = self_signed(trust_domain, UnixMillis::now())?;
        Ok(Ca {
            issuer: Issuer::new(ca_params(FIRST_CA_ID, trust_domain), key),
            certificate,
            expires_at,
            jwt_svids: JwtSvidKey::in_memory(trust_domain),
        })
    }

    /// The key that signs and checks JWT-SVIDs.
    pub fn jwt_svids(&self) -> &JwtSvidKey {
        &self.jwt_svids
    }

    /// The CA certificate (DER): the trust bundle.
    pub fn certificate(&self) -> &[u8] {
        &self.certificate
    }

    /// The trust bundle as PEM.
    pub fn bundle_pem(&self) -> String {
        to_pem(&self.certificate)
    }

    /// The trust bundle in the SPIFFE bundle format: a JWK Set whose keys are the CA keys, each
    /// with `use: x509-svid` and its certificate in `x5c`.
    pub fn bundle_jwks(&self) -> serde_json::Value {
        use base64::Engine;
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        // An uncompressed P-256 point: 0x04, then x and y, 32 bytes each.
        let point = self.issuer.key().public_key_raw();
        let (x, y) = point
            .get(1..)
            .unwrap_or_default()
            .split_at(point.len().saturating_sub(1) / 2);
        serde_json::json!({
            "keys": [{
                "use": "x509-svid",
                "kty": "EC",
                "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(x),
                "y": URL_SAFE_NO_PAD.encode(y),
                "x5c": [STANDARD.encode(&self.certificate)],
            }],
            "spiffe_refresh_hint": BUNDLE_REFRESH_HINT_SECONDS,
        })
    }

    /// Signs a fresh key pair's X.509-SVID for `spiffe_id`, valid for `ttl` from `now` (never
    /// beyond the CA's own expiry).
    pub fn issue(
        &self,
        spiffe_id: &SpiffeId,
        ttl: Duration,
        now: UnixMillis,
    ) -> Result<IssuedSvid> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|error| Error::internal(format!("cannot generate an SVID key: {error}")))?;
        let expires_at = UnixMillis(now.0.saturating_add(millis(ttl)).min(self.expires_at.0));
        let serial = serial_number();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(spiffe_id.as_str().try_into().map_err(
                |_| Error::internal("a SPIFFE ID that is not an IA5 string"),
            )?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = offset(UnixMillis(now.0 - millis(BACKDATE)))?;
        params.not_after = offset(expires_at)?;
        let certificate = params
            .signed_by(&key, &self.issuer)
            .map_err(|error| Error::internal(format!("cannot sign an SVID: {error}")))?;
        let der = certificate.der().to_vec();
        Ok(IssuedSvid {
            spiffe_id: spiffe_id.clone(),
            thumbprint: thumbprint(&der),
            certificate: der,
            private_key: key.serialize_der(),
            serial: crate::domain::ids::hex(&serial),
            issued_at: now,
            expires_at,
        })
    }
}

/// A new self-signed CA, sealed for the store.
fn generate(
    master_key: &MasterKey,
    trust_domain: &TrustDomain,
    now: UnixMillis,
) -> Result<StoredCaKey> {
    let (key, certificate, expires_at) = self_signed(trust_domain, now)?;
    Ok(StoredCaKey {
        id: FIRST_CA_ID.to_owned(),
        certificate,
        sealed_private_key: master_key.seal(&seal_context(FIRST_CA_ID), &key.serialize_der()),
        created_at: now,
        expires_at,
    })
}

/// A fresh CA key and its self-signed certificate (DER), valid from `now`.
fn self_signed(
    trust_domain: &TrustDomain,
    now: UnixMillis,
) -> Result<(KeyPair, Vec<u8>, UnixMillis)> {
    let failed = |error: rcgen::Error| Error::internal(format!("cannot create the CA: {error}"));
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(failed)?;
    let expires_at = UnixMillis(now.0 + millis(CA_LIFETIME));
    let mut params = ca_params(FIRST_CA_ID, trust_domain);
    params.serial_number = Some(SerialNumber::from_slice(&serial_number()));
    params.not_before = offset(UnixMillis(now.0 - millis(BACKDATE)))?;
    params.not_after = offset(expires_at)?;
    let certificate = params.self_signed(&key).map_err(failed)?;
    Ok((key, certificate.der().to_vec(), expires_at))
}

/// The CA's name and constraints. Rebuilt the same way on every start, so the issuer name in
/// each leaf matches the stored CA certificate's subject.
fn ca_params(id: &str, trust_domain: &TrustDomain) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Warrant");
    name.push(DnType::CommonName, format!("Warrant CA {id}"));
    params.distinguished_name = name;
    if let Ok(uri) = format!("spiffe://{}", trust_domain.as_str()).try_into() {
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// What the CA key's sealing is bound to, so a sealed key cannot be swapped between rows.
fn seal_context(id: &str) -> Vec<u8> {
    format!("warrant-ca:{id}").into_bytes()
}

/// Base64url (unpadded) SHA-256 of a certificate's DER, as RFC 8705 `x5t#S256` has it.
pub fn thumbprint(der: &[u8]) -> String {
    use base64::Engine;
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// PEM of one certificate.
pub fn to_pem(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

/// The DER of the first `CERTIFICATE` block of `pem`.
pub fn first_certificate_der(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let (_, rest) = pem.split_once("-----BEGIN CERTIFICATE-----")?;
    let (body, _) = rest.split_once("-----END CERTIFICATE-----")?;
    let body: String = body.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// PEM of a PKCS#8 private key.
pub fn key_to_pem(pkcs8: &[u8]) -> String {
    pem_block("PRIVATE KEY", pkcs8)
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// 16 random bytes, the top bit clear so the DER integer is positive and the next one set so
/// it keeps all 16 bytes.
fn serial_number() -> [u8; 16] {
    let mut serial = random::bytes::<16>();
    serial[0] = (serial[0] & 0x3f) | 0x40;
    serial
}

fn offset(at: UnixMillis) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(at.0 / 1000)
        .map_err(|_| Error::internal("a certificate time out of range"))
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
