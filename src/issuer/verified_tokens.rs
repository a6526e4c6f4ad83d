//! Tokens whose signature the broker has already verified.
//!
//! Downstream APIs introspect the same token on every call an agent makes, and the signature
//! check is the dearest part of introspection (an Ed25519 verification costs more than the rest
//! of the call's CPU work). The signature of a given token text never changes, so once verified it
//! need not be verified again; everything else (key still published, algorithm, issuer,
//! audience, expiry, lease still live) is checked on every call.
//!
//! Entries are SHA-256 digests of the whole token text, signature included: a token differing
//! in any byte is a different entry and gets verified. Only tokens that verified are entered.

use std::collections::HashSet;
use std::sync::Mutex;

use ring::digest;

/// Most digests held; the set starts over when full (a miss only costs a verification).
const CAPACITY: usize = 50_000;

/// A token's identity in the set.
pub struct TokenDigest([u8; 32]);

/// The set of tokens found well signed.
#[derive(Debug, Default)]
pub struct VerifiedTokens {
    digests: Mutex<HashSet<[u8; 32]>>,
}

impl VerifiedTokens {
    /// The digest of `token`'s text.
    pub fn digest(token: &str) -> TokenDigest {
        let mut bytes = [0; 32];
        bytes.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
        TokenDigest(bytes)
    }

    /// Whether the token with `digest` was entered as well signed.
    pub fn contains(&self, digest: &TokenDigest) -> bool {
        self.digests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&digest.0)
    }

    /// Enters the token with `digest`, whose signature has just been verified.
    pub fn insert(&self, digest: TokenDigest) {
        let mut digests = self
            .digests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if digests.len() >= CAPACITY {
            digests.clear();
        }
        digests.insert(digest.0);
    }
}

#[cfg(test)]
mod tests {
    use super::VerifiedTokens;

    #[test]
    fn a_token_differing_in_one_byte_is_not_taken_as_verified() {
        let verified = VerifiedTokens::default();
        verified.insert(VerifiedTokens::digest("header.claims.signature"));
        assert!(verified.contains(&VerifiedTokens::digest("header.claims.signature")));
        assert!(!verified.contains(&VerifiedTokens::digest("header.claims.signaturf")));
    }
}
