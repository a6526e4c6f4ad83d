//! Everything that makes or checks a secret: the master key that seals private keys at rest,
//! the signing keys and their rotation, access tokens, and workload bearer credentials.

pub mod api_key;
pub mod credential;
pub mod jwt;
pub mod keyring;
pub mod keys;
pub mod master_key;
pub mod random;
pub mod verified_tokens;

pub use credential::BearerCredential;
pub use keyring::Keyring;
pub use keys::{Jwk, KeyAlgorithm, SigningKey, VerifyingKey};
pub use master_key::MasterKey;
