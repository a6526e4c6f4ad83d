//! Join tokens: `wjt_` + a 32-hex-digit id + `_` + 32 random bytes (base64url), created by an
//! admin for one workload, used once, within a short TTL. The store keeps only the SHA-256 of
//! the secret.

use std::fmt;

use crate::issuer::credential::{StoredCredential, generate_secret, parse_secret};

const PREFIX: &str = "wjt_";

/// A join token in clear, as handed to the admin once. `Debug` never shows it.
pub struct JoinToken(String);

impl JoinToken {
    pub fn generate() -> (Self, StoredCredential) {
        let (text, stored) = generate_secret(PREFIX);
        (JoinToken(text), stored)
    }

    /// The id and secret hash of a presented token, or `None` when it does not have the shape.
    pub fn parse(text: &str) -> Option<StoredCredential> {
        parse_secret(PREFIX, text)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinToken([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_parses_back_and_a_credential_does_not() {
        let (token, stored) = JoinToken::generate();
        assert_eq!(JoinToken::parse(token.expose()), Some(stored));
        let (credential, _) = crate::issuer::BearerCredential::generate();
        assert_eq!(JoinToken::parse(credential.expose()), None);
        assert!(!format!("{token:?}").contains(token.expose()));
    }
}
