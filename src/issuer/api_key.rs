//! API keys: opaque secrets for APIs that take a key rather than a JWT. A key is `wak_`, the
//! 32 hex digits of its lease's id, `_`, and 32 random bytes (base64url): the prefix lets secret
//! scanners find a leaked key, the lease id lets introspection find its lease. The broker keeps
//! only the SHA-256 of the secret part, written when the key is first handed out.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::credential::{StoredCredential, parse_secret};
use crate::domain::LeaseId;

/// What every API key starts with.
pub const API_KEY_PREFIX: &str = "wak_";

/// A fresh key for `lease` and the SHA-256 of its secret part.
pub fn generate(lease: &LeaseId) -> (String, Vec<u8>) {
    let secret = URL_SAFE_NO_PAD.encode(super::random::bytes::<32>());
    let hash = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .to_vec();
    (format!("{API_KEY_PREFIX}{}_{secret}", lease.digits()), hash)
}

/// The lease and secret hash of a presented key, or `None` when it is not shaped like one.
pub fn parse(text: &str) -> Option<(LeaseId, Vec<u8>)> {
    let StoredCredential { id, secret_sha256 } = parse_secret(API_KEY_PREFIX, text)?;
    let lease = LeaseId::from_digits("token", &id).ok()?;
    Some((lease, secret_sha256))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::UnixMillis;

    #[test]
    fn a_key_names_its_lease_and_matches_only_its_secret() {
        let lease = LeaseId::generate(UnixMillis::now());
        let (key, hash) = generate(&lease);
        assert!(key.starts_with(API_KEY_PREFIX));
        assert_eq!(parse(&key), Some((lease.clone(), hash.clone())));
        let mut altered = key.clone();
        let last = altered.pop().unwrap();
        altered.push(if last == 'A' { 'B' } else { 'A' });
        let (same_lease, other_hash) = parse(&altered).unwrap();
        assert_eq!(same_lease, lease);
        assert_ne!(other_hash, hash);
        for junk in [
            "",
            "wak_",
            "wrt_x",
            &key[..key.len() - 1],
            &key.replace("wak_", "wrt_"),
        ] {
            assert_eq!(parse(junk), None, "{junk}");
        }
    }
}
