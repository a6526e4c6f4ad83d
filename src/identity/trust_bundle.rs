//! The trust domain's X.509 CAs as last loaded from the store: every CA in the trust bundle
//! (the current one, one a rotation will activate, retired ones whose SVIDs may still be
//! live), and which of them signs at a given instant.

use rcgen::{Issuer, KeyPair};

use crate::domain::UnixMillis;
use crate::store::StoredCaKey;

/// How often a bundle consumer should fetch the bundle again, in seconds.
const BUNDLE_REFRESH_HINT_SECONDS: u64 = 300;

/// One CA of the bundle, its key unsealed.
pub struct LoadedCa {
    pub id: String,
    /// DER.
    pub certificate: Vec<u8>,
    pub expires_at: UnixMillis,
    pub activated_at: UnixMillis,
    pub publish_until: Option<UnixMillis>,
    pub(super) issuer: Issuer<'static, KeyPair>,
}

/// The CAs of the trust bundle; never empty.
pub struct TrustBundle {
    /// Oldest activation first.
    cas: Vec<LoadedCa>,
    /// Grows with every change of the set, so what is built from a bundle (a TLS verifier)
    /// knows when to build again.
    generation: u64,
}

impl TrustBundle {
    /// `cas` oldest activation first; `None` if empty.
    pub(super) fn new(cas: Vec<LoadedCa>, generation: u64) -> Option<TrustBundle> {
        (!cas.is_empty()).then_some(TrustBundle { cas, generation })
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

    /// The CA certificates (DER), oldest activation first.
    pub fn certificates(&self) -> impl Iterator<Item = &[u8]> {
        self.cas.iter().map(|ca| ca.certificate.as_slice())
    }

    /// The certificates' DER one after another, as the SPIFFE Workload API carries a bundle.
    pub fn der(&self) -> Vec<u8> {
        self.certificates().flatten().copied().collect()
    }

    /// The certificates as PEM, one block each.
    pub fn pem(&self) -> String {
        self.certificates().map(super::pem::to_pem).collect()
    }

    /// The bundle in the SPIFFE bundle format: a JWK Set with one key per CA, each with
    /// `use: x509-svid` and its certificate in `x5c`.
    pub fn jwks(&self) -> serde_json::Value {
        use base64::Engine;
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        let keys: Vec<_> = self
            .cas
            .iter()
            .map(|ca| {
                // An uncompressed P-256 point: 0x04, then x and y, 32 bytes each.
                let point = ca.issuer.key().public_key_raw();
                let (x, y) = point
                    .get(1..)
                    .unwrap_or_default()
                    .split_at(point.len().saturating_sub(1) / 2);
                serde_json::json!({
                    "use": "x509-svid",
                    "kty": "EC",
                    "crv": "P-256",
                    "x": URL_SAFE_NO_PAD.encode(x),
                    "y": URL_SAFE_NO_PAD.encode(y),
                    "x5c": [STANDARD.encode(&ca.certificate)],
                })
            })
            .collect();
        serde_json::json!({ "keys": keys, "spiffe_refresh_hint": BUNDLE_REFRESH_HINT_SECONDS })
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
