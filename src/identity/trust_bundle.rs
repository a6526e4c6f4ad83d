//! The trust domain's X.509 CAs as last loaded: the CAs that may sign (Warrant's own from the
//! store: the current one, one a rotation will activate, retired ones whose SVIDs may still be
//! live; or the intermediate from the configuration), which of them signs at a given instant,
//! and the roots that SVIDs chain to, which are the trust bundle.

use rcgen::{Issuer, KeyPair};

use crate::domain::UnixMillis;
use crate::store::StoredCaKey;

/// How often a bundle consumer should fetch the bundle again, in seconds.
const BUNDLE_REFRESH_HINT_SECONDS: u64 = 300;

/// One CA that may sign, its key at hand.
pub struct LoadedCa {
    pub id: String,
    /// DER.
    pub certificate: Vec<u8>,
    /// What follows each leaf it signs in an SVID's chain (DER): nothing for Warrant's own
    /// CAs, which are roots; the configured chain for an intermediate.
    pub chain: Vec<Vec<u8>>,
    pub expires_at: UnixMillis,
    pub activated_at: UnixMillis,
    pub publish_until: Option<UnixMillis>,
    pub(super) issuer: Issuer<'static, KeyPair>,
}

/// The CAs that may sign (never none) and the trust bundle.
pub struct TrustBundle {
    /// Oldest activation first.
    cas: Vec<LoadedCa>,
    /// The bundle's certificates (DER): the CAs themselves, or the configured roots.
    roots: Vec<Vec<u8>>,
    /// The bundle as every answer carries it, encoded once per bundle.
    encoded: Encoded,
    /// Grows with every change of the set, so what is built from a bundle (a TLS verifier)
    /// knows when to build again.
    generation: u64,
}

/// The bundle's certificates in the forms the answers carry.
struct Encoded {
    /// DER one after another, as the SPIFFE Workload API carries a bundle.
    der: Vec<u8>,
    /// PEM, one block each.
    pem: String,
    /// The SPIFFE bundle format.
    jwks: serde_json::Value,
}

impl Encoded {
    fn of(roots: &[Vec<u8>]) -> Encoded {
        let keys: Vec<_> = roots
            .iter()
            .filter_map(|root| jwk_of_certificate(root))
            .collect();
        Encoded {
            der: roots.concat(),
            pem: roots.iter().map(|root| super::pem::to_pem(root)).collect(),
            jwks: serde_json::json!({
                "keys": keys,
                "spiffe_refresh_hint": BUNDLE_REFRESH_HINT_SECONDS,
            }),
        }
    }
}

impl TrustBundle {
    /// Warrant's own CAs, oldest activation first, each its own root; `None` if empty.
    pub(super) fn own(cas: Vec<LoadedCa>, generation: u64) -> Option<TrustBundle> {
        let roots: Vec<_> = cas.iter().map(|ca| ca.certificate.clone()).collect();
        (!cas.is_empty()).then(|| TrustBundle {
            cas,
            encoded: Encoded::of(&roots),
            roots,
            generation,
        })
    }

    /// An intermediate CA that chains to `roots`.
    pub(super) fn upstream(signer: LoadedCa, roots: Vec<Vec<u8>>) -> TrustBundle {
        TrustBundle {
            cas: vec![signer],
            encoded: Encoded::of(&roots),
            roots,
            generation: 0,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The CA that signs at `now`: the newest one activated by then (the oldest, should the
    /// clock have gone back before every activation).
    pub fn signer(&self, now: UnixMillis) -> &LoadedCa {
        self.cas
            .iter()
            .rev()
            .find(|ca| ca.activated_at <= now)
            .unwrap_or(&self.cas[0])
    }

    /// A CA a rotation has stored but that does not sign before its activation.
    pub fn pending(&self, now: UnixMillis) -> Option<&LoadedCa> {
        self.cas.iter().find(|ca| ca.activated_at > now)
    }

    /// The bundle's certificates (DER); Warrant's own CAs oldest activation first.
    pub fn certificates(&self) -> impl Iterator<Item = &[u8]> {
        self.roots.iter().map(Vec::as_slice)
    }

    /// The certificates' DER one after another, as the SPIFFE Workload API carries a bundle.
    pub fn der(&self) -> &[u8] {
        &self.encoded.der
    }

    /// The certificates as PEM, one block each.
    pub fn pem(&self) -> &str {
        &self.encoded.pem
    }

    /// The bundle in the SPIFFE bundle format: a JWK Set with one key per certificate, each
    /// with `use: x509-svid` and the certificate in `x5c`.
    pub fn jwks(&self) -> &serde_json::Value {
        &self.encoded.jwks
    }

    /// Whether `stored` holds exactly these CAs, with the same retirement.
    pub(super) fn matches(&self, stored: &[StoredCaKey]) -> bool {
        self.cas.len() == stored.len()
            && self
                .cas
                .iter()
                .zip(stored)
                .all(|(ca, key)| ca.id == key.id && ca.publish_until == key.publish_until)
    }
}

/// The JWK of a CA certificate for the SPIFFE bundle: its public key (EC P-256 or P-384, or
/// RSA), `use: x509-svid`, and the certificate in `x5c`; `None` for other keys or bad DER.
pub fn jwk_of_certificate(der: &[u8]) -> Option<serde_json::Value> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use x509_parser::prelude::{FromDer, X509Certificate};
    use x509_parser::public_key::PublicKey;
    let (_, certificate) = X509Certificate::from_der(der).ok()?;
    let x5c = [STANDARD.encode(der)];
    // Big-endian integers without the sign byte DER may add.
    let unsigned = |bytes: &[u8]| -> String {
        let start = bytes
            .iter()
            .position(|byte| *byte != 0)
            .unwrap_or(bytes.len());
        URL_SAFE_NO_PAD.encode(&bytes[start..])
    };
    match certificate.public_key().parsed().ok()? {
        PublicKey::EC(point) => {
            // Uncompressed points only: 0x04, then x and y of equal length.
            let (crv, coordinate) = match point.data() {
                [0x04, rest @ ..] if rest.len() == 64 => ("P-256", 32),
                [0x04, rest @ ..] if rest.len() == 96 => ("P-384", 48),
                _ => return None,
            };
            let (x, y) = point.data()[1..].split_at(coordinate);
            Some(serde_json::json!({
                "use": "x509-svid", "kty": "EC", "crv": crv,
                "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y), "x5c": x5c,
            }))
        }
        PublicKey::RSA(key) => Some(serde_json::json!({
            "use": "x509-svid", "kty": "RSA",
            "n": unsigned(key.modulus), "e": unsigned(key.exponent), "x5c": x5c,
        })),
        _ => None,
    }
}
