//! Workload bearer credentials: `wrt_` + a 32-hex-digit id + `_` + 32 random bytes (base64url).
//! The broker keeps only the SHA-256 of the secret part, looked up by the id. Join tokens have
//! the same shape under their own prefix.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const PREFIX: &str = "wrt_";
const ID_LEN: usize = 32;
const SECRET_LEN: usize = 43;

/// A bearer credential in clear, as handed to its workload once. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerCredential(String);

/// What the store keeps of a credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCredential {
    pub id: String,
    pub secret_sha256: Vec<u8>,
}

impl BearerCredential {
    /// A fresh credential and what the store keeps of it.
    pub fn generate() -> (Self, StoredCredential) {
        let (text, stored) = generate_secret(PREFIX);
        (BearerCredential(text), stored)
    }

    /// Splits a presented credential into its id and the hash of its secret, or `None` when it
    /// does not have the credential's shape.
    pub fn parse(text: &str) -> Option<StoredCredential> {
        parse_secret(PREFIX, text)
    }

    /// The credential text, for handing to its workload.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A fresh `<prefix><id>_<secret>` and what the store keeps of it.
pub fn generate_secret(prefix: &str) -> (String, StoredCredential) {
    let id = crate::domain::ids::hex(&super::random::bytes::<16>());
    let secret = URL_SAFE_NO_PAD.encode(super::random::bytes::<32>());
    let stored = StoredCredential {
        id: id.clone(),
        secret_sha256: sha256(secret.as_bytes()),
    };
    (format!("{prefix}{id}_{secret}"), stored)
}

/// The id and secret hash of a presented `<prefix><id>_<secret>`, or `None` when it does not
/// have that shape.
pub fn parse_secret(prefix: &str, text: &str) -> Option<StoredCredential> {
    let rest = text.strip_prefix(prefix)?;
    if rest.len() != ID_LEN + 1 + SECRET_LEN || !rest.is_char_boundary(ID_LEN) {
        return None;
    }
    let (id, secret) = rest.split_at(ID_LEN);
    let secret = secret.strip_prefix('_')?;
    if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(StoredCredential {
        id: id.to_owned(),
        secret_sha256: sha256(secret.as_bytes()),
    })
}

impl fmt::Debug for BearerCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerCredential([redacted])")
    }
}

/// Compares two digests without an early exit, so timing reveals nothing of a stored hash.
pub fn digests_match(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .fold(0u8, |difference, (x, y)| difference | (x ^ y))
            == 0
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_credential_parses_to_its_stored_form() {
        let (credential, stored) = BearerCredential::generate();
        assert_eq!(BearerCredential::parse(credential.expose()), Some(stored));
        assert_eq!(format!("{credential:?}"), "BearerCredential([redacted])");
    }

    #[test]
    fn altered_secret_no_longer_matches() {
        let (credential, stored) = BearerCredential::generate();
        let mut text = credential.expose().to_owned();
        let last = text.pop().unwrap();
        text.push(if last == 'A' { 'B' } else { 'A' });
        let presented = BearerCredential::parse(&text).unwrap();
        assert!(!digests_match(
            &presented.secret_sha256,
            &stored.secret_sha256
        ));
    }

    #[test]
    fn refuses_shapes_that_are_not_credentials() {
        for junk in [
            "",
            "wrt_",
            "Bearer x",
            "wrt_zz",
            &format!("wrt_{}_{}", "g".repeat(32), "a".repeat(43)),
            "wrt_é",
        ] {
            assert_eq!(BearerCredential::parse(junk), None, "{junk}");
        }
    }
}
