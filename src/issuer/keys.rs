//! Signing keys (Ed25519 by default, ES256 on request) and their public halves as JWKs.
//! Key ids are RFC 7638 thumbprints, so a kid names exactly one public key.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{
    self, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ED25519, EcdsaKeyPair,
    Ed25519KeyPair, KeyPair,
};
use serde::{Deserialize, Serialize};

/// A JWS signature algorithm Warrant signs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// Ed25519 (`EdDSA`): the default; fast and deterministic.
    EdDsa,
    /// ECDSA P-256 with SHA-256 (`ES256`), for clients that lack EdDSA.
    Es256,
}

impl KeyAlgorithm {
    /// The JWS `alg` name.
    pub fn jws_name(self) -> &'static str {
        match self {
            KeyAlgorithm::EdDsa => "EdDSA",
            KeyAlgorithm::Es256 => "ES256",
        }
    }

    pub fn from_jws_name(name: &str) -> Option<Self> {
        match name {
            "EdDSA" => Some(KeyAlgorithm::EdDsa),
            "ES256" => Some(KeyAlgorithm::Es256),
            _ => None,
        }
    }
}

/// A public key as a JSON Web Key (RFC 7517), the form published at `jwks.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    pub kid: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub key_use: String,
}

/// A public key that checks signatures made by one [`SigningKey`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyingKey {
    pub kid: String,
    pub algorithm: KeyAlgorithm,
    /// Ed25519: the 32-byte key. ES256: the 65-byte uncompressed point.
    pub public_key: Vec<u8>,
}

/// Why a JWK could not be used as a Warrant verifying key.
#[derive(Debug, thiserror::Error)]
#[error("unsupported or malformed JWK: {0}")]
pub struct JwkError(&'static str);

impl VerifyingKey {
    pub fn new(algorithm: KeyAlgorithm, public_key: Vec<u8>) -> Self {
        let kid = thumbprint(algorithm, &public_key);
        VerifyingKey {
            kid,
            algorithm,
            public_key,
        }
    }

    /// Whether `signature` is a valid signature of `message` under this key.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let algorithm: &dyn signature::VerificationAlgorithm = match self.algorithm {
            KeyAlgorithm::EdDsa => &ED25519,
            KeyAlgorithm::Es256 => &ECDSA_P256_SHA256_FIXED,
        };
        signature::UnparsedPublicKey::new(algorithm, &self.public_key)
            .verify(message, signature)
            .is_ok()
    }

    pub fn to_jwk(&self) -> Jwk {
        let (kty, crv, x, y) = jwk_members(self.algorithm, &self.public_key);
        Jwk {
            kty: kty.into(),
            crv: crv.into(),
            x,
            y,
            kid: self.kid.clone(),
            alg: self.algorithm.jws_name().into(),
            key_use: "sig".into(),
        }
    }

    /// Reads a JWK published by a Warrant broker. The kid must be the key's thumbprint, so a
    /// tampered JWKS cannot pair one key's id with another key.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, JwkError> {
        let algorithm = KeyAlgorithm::from_jws_name(&jwk.alg).ok_or(JwkError("alg"))?;
        let decode = |text: &str| URL_SAFE_NO_PAD.decode(text).map_err(|_| JwkError("base64"));
        let public_key = match (algorithm, jwk.kty.as_str(), jwk.crv.as_str(), &jwk.y) {
            (KeyAlgorithm::EdDsa, "OKP", "Ed25519", None) => decode(&jwk.x)?,
            (KeyAlgorithm::Es256, "EC", "P-256", Some(y)) => {
                let mut point = vec![0x04];
                point.extend(decode(&jwk.x)?);
                point.extend(decode(y)?);
                point
            }
            _ => return Err(JwkError("kty/crv")),
        };
        let expected_len = match algorithm {
            KeyAlgorithm::EdDsa => 32,
            KeyAlgorithm::Es256 => 65,
        };
        if public_key.len() != expected_len {
            return Err(JwkError("key length"));
        }
        let key = VerifyingKey::new(algorithm, public_key);
        if key.kid != jwk.kid {
            return Err(JwkError("kid is not the key's thumbprint"));
        }
        Ok(key)
    }
}

/// The JWK members of a public key: kty, crv, x and (EC only) y.
fn jwk_members(
    algorithm: KeyAlgorithm,
    public_key: &[u8],
) -> (&'static str, &'static str, String, Option<String>) {
    match algorithm {
        KeyAlgorithm::EdDsa => ("OKP", "Ed25519", URL_SAFE_NO_PAD.encode(public_key), None),
        KeyAlgorithm::Es256 => {
            // Uncompressed point: 0x04 || X (32 bytes) || Y (32 bytes).
            let (x, y) = public_key[1..].split_at(32);
            (
                "EC",
                "P-256",
                URL_SAFE_NO_PAD.encode(x),
                Some(URL_SAFE_NO_PAD.encode(y)),
            )
        }
    }
}

/// RFC 7638 JWK thumbprint: SHA-256 over the required members in lexicographic order.
fn thumbprint(algorithm: KeyAlgorithm, public_key: &[u8]) -> String {
    let (kty, crv, x, y) = jwk_members(algorithm, public_key);
    let canonical = match y {
        None => format!(r#"{{"crv":"{crv}","kty":"{kty}","x":"{x}"}}"#),
        Some(y) => format!(r#"{{"crv":"{crv}","kty":"{kty}","x":"{x}","y":"{y}"}}"#),
    };
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

enum KeyPairKind {
    Ed25519(Ed25519KeyPair),
    Es256(EcdsaKeyPair, SystemRandom),
}

/// A private signing key, parsed once and shared; its `Debug` output never shows the key.
pub struct SigningKey {
    verifying: VerifyingKey,
    pair: KeyPairKind,
    /// The base64url JWS header, the same for every token this key signs.
    encoded_header: String,
}

/// A private key that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("the stored {0} private key could not be parsed")]
pub struct KeyRejected(&'static str);

impl SigningKey {
    /// Generates a key; returns it with its PKCS#8 encoding, to be sealed and stored.
    pub fn generate(algorithm: KeyAlgorithm) -> (Self, Vec<u8>) {
        let rng = SystemRandom::new();
        // Generation fails only when the OS random number generator does.
        let pkcs8 = match algorithm {
            KeyAlgorithm::EdDsa => Ed25519KeyPair::generate_pkcs8(&rng),
            KeyAlgorithm::Es256 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            }
        }
        .expect("key generation from the OS random number generator")
        .as_ref()
        .to_vec();
        let key = Self::from_pkcs8(algorithm, &pkcs8).expect("a freshly generated key parses");
        (key, pkcs8)
    }

    pub fn from_pkcs8(algorithm: KeyAlgorithm, pkcs8: &[u8]) -> Result<Self, KeyRejected> {
        let (pair, public_key) = match algorithm {
            KeyAlgorithm::EdDsa => {
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
                    .map_err(|_| KeyRejected("Ed25519"))?;
                let public_key = pair.public_key().as_ref().to_vec();
                (KeyPairKind::Ed25519(pair), public_key)
            }
            KeyAlgorithm::Es256 => {
                let rng = SystemRandom::new();
                let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
                    .map_err(|_| KeyRejected("ES256"))?;
                let public_key = pair.public_key().as_ref().to_vec();
                (KeyPairKind::Es256(pair, rng), public_key)
            }
        };
        let verifying = VerifyingKey::new(algorithm, public_key);
        let header = serde_json::json!({ "alg": algorithm.jws_name(), "typ": "at+jwt", "kid": verifying.kid });
        let encoded_header = URL_SAFE_NO_PAD.encode(header.to_string());
        Ok(SigningKey {
            verifying,
            pair,
            encoded_header,
        })
    }

    pub fn kid(&self) -> &str {
        &self.verifying.kid
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.verifying.algorithm
    }

    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.verifying
    }

    /// The base64url-encoded JWS protected header for tokens signed by this key.
    pub fn encoded_header(&self) -> &str {
        &self.encoded_header
    }

    /// Signs `message` (JWS signing input); ES256 signatures use the fixed r || s form.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        match &self.pair {
            KeyPairKind::Ed25519(pair) => pair.sign(message).as_ref().to_vec(),
            KeyPairKind::Es256(pair, rng) => pair
                .sign(rng, message)
                // ECDSA signing fails only when the random number generator does.
                .expect("ECDSA signing with the OS random number generator")
                .as_ref()
                .to_vec(),
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.verifying.kid)
            .field("algorithm", &self.verifying.algorithm)
            .field("private_key", &"[redacted]")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwk_round_trips_and_kid_is_bound_to_the_key() {
        for algorithm in [KeyAlgorithm::EdDsa, KeyAlgorithm::Es256] {
            let (key, pkcs8) = SigningKey::generate(algorithm);
            let jwk = key.verifying_key().to_jwk();
            assert_eq!(VerifyingKey::from_jwk(&jwk).unwrap(), *key.verifying_key());
            let reparsed = SigningKey::from_pkcs8(algorithm, &pkcs8).unwrap();
            assert_eq!(reparsed.kid(), key.kid());

            let (other, _) = SigningKey::generate(algorithm);
            let mut swapped = other.verifying_key().to_jwk();
            swapped.kid = key.kid().to_owned();
            assert!(VerifyingKey::from_jwk(&swapped).is_err());
        }
    }

    #[test]
    fn signature_verifies_only_for_the_signed_message_and_key() {
        for algorithm in [KeyAlgorithm::EdDsa, KeyAlgorithm::Es256] {
            let (key, _) = SigningKey::generate(algorithm);
            let signature = key.sign(b"message");
            assert!(key.verifying_key().verify(b"message", &signature));
            assert!(!key.verifying_key().verify(b"messagf", &signature));
            let (other, _) = SigningKey::generate(algorithm);
            assert!(!other.verifying_key().verify(b"message", &signature));
        }
    }

    #[test]
    fn debug_output_hides_the_private_key() {
        let (key, _) = SigningKey::generate(KeyAlgorithm::EdDsa);
        assert!(format!("{key:?}").contains("[redacted]"));
    }
}
