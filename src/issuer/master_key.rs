//! The master key: 32 bytes that seal signing keys at rest with AES-256-GCM. It never enters the
//! database; it comes from a file or the environment.

use std::fmt;
use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

/// The key that seals private keys stored in the database, and from which the audit trail's
/// HMAC key is derived (so the two uses never share key material).
pub struct MasterKey {
    sealing: LessSafeKey,
    audit: ring::hmac::Key,
}

/// Why a master key could not be loaded or a sealed value not be opened.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error("keys.master_key_file: cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: the master key must be 32 bytes, base64-encoded")]
    Malformed { origin: String },
    #[error("a sealed key could not be opened: wrong master key, or the data was altered")]
    Unsealing,
}

impl MasterKey {
    /// Decodes a base64 master key; `origin` names where it came from, for the error.
    pub fn from_base64(origin: &str, text: &str) -> Result<Self, MasterKeyError> {
        let malformed = || MasterKeyError::Malformed {
            origin: origin.into(),
        };
        let bytes = STANDARD.decode(text.trim()).map_err(|_| malformed())?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| malformed())?;
        let audit = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"warrant")
            .extract(&bytes)
            .expand(&[b"audit-hmac/v1"], ring::hmac::HMAC_SHA256)
            // Expansion fails only for outputs longer than 255 hash lengths; this is one.
            .expect("HKDF expansion to one HMAC key")
            .into();
        Ok(MasterKey {
            sealing: LessSafeKey::new(key),
            audit,
        })
    }

    /// A random key that lives only in memory, for a CA that is never stored (the benchmark's
    /// reference).
    pub fn ephemeral() -> Self {
        Self::from_base64("memory", &STANDARD.encode(super::random::bytes::<32>()))
            // Base64 of 32 random bytes is always a well-formed key.
            .expect("a well-formed random key")
    }

    /// Reads the key at `path`, first creating it (owner-only permissions) if `create` is set
    /// and the file does not exist.
    pub fn load_or_create(path: &Path, create: bool) -> Result<Self, MasterKeyError> {
        let io = |source| MasterKeyError::Io {
            path: path.display().to_string(),
            source,
        };
        if create && !path.exists() {
            let encoded = STANDARD.encode(super::random::bytes::<32>());
            write_private_file(path, encoded.as_bytes()).map_err(io)?;
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Self::from_base64(&path.display().to_string(), &text)
    }

    /// Encrypts `plaintext`, bound to `context` (for example the key id), as nonce || ciphertext.
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce_bytes = super::random::bytes::<NONCE_LEN>();
        let mut sealed = plaintext.to_vec();
        self.sealing
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(context),
                &mut sealed,
            )
            // Sealing fails only for inputs beyond AES-GCM's size limit (64 GiB); keys are tiny.
            .expect("AES-GCM sealing of a small buffer");
        let mut output = nonce_bytes.to_vec();
        output.append(&mut sealed);
        output
    }

    /// Decrypts what [`MasterKey::seal`] produced with the same `context`.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, MasterKeyError> {
        if sealed.len() < NONCE_LEN {
            return Err(MasterKeyError::Unsealing);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| MasterKeyError::Unsealing)?;
        let mut buffer = ciphertext.to_vec();
        let plaintext = self
            .sealing
            .open_in_place(nonce, Aad::from(context), &mut buffer)
            .map_err(|_| MasterKeyError::Unsealing)?;
        Ok(plaintext.to_vec())
    }
}

impl MasterKey {
    /// The key that HMACs secrets for the audit trail.
    pub fn audit_key(&self) -> crate::audit::AuditKey {
        crate::audit::AuditKey::new(self.audit.clone())
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey([redacted])")
    }
}

/// Creates `path` readable only by its owner and writes `contents`; fails if it exists.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::from_base64("test", &STANDARD.encode([7u8; 32])).unwrap()
    }

    #[test]
    fn sealed_value_opens_only_with_same_context_and_intact_bytes() {
        let sealed = key().seal(b"kid-1", b"private key");
        assert_eq!(key().open(b"kid-1", &sealed).unwrap(), b"private key");
        assert!(key().open(b"kid-2", &sealed).is_err());
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(key().open(b"kid-1", &altered).is_err());
        let other = MasterKey::from_base64("test", &STANDARD.encode([8u8; 32])).unwrap();
        assert!(other.open(b"kid-1", &sealed).is_err());
    }

    #[test]
    fn refuses_master_keys_of_wrong_length() {
        let error =
            MasterKey::from_base64("WARRANT_MASTER_KEY", &STANDARD.encode([1u8; 16])).unwrap_err();
        assert!(error.to_string().starts_with("WARRANT_MASTER_KEY:"));
    }
}
