//! Identifiers of tasks, leases and credentials: a readable prefix and 32 hex digits whose first
//! 12 encode the creation time in milliseconds, so ids sort by age and index inserts stay local.

use std::fmt;
use std::marker::PhantomData;

use crate::error::Error;

/// What kind of object an [`Id`] names: its prefix and the noun used in error messages.
pub trait IdKind {
    const PREFIX: &'static str;
    const NOUN: &'static str;
}

/// A validated identifier of kind `K`; a malformed id cannot be constructed.
pub struct Id<K: IdKind>(String, PhantomData<fn() -> K>);

/// Marker for task ids (`task_...`).
pub enum TaskKind {}
impl IdKind for TaskKind {
    const PREFIX: &'static str = "task_";
    const NOUN: &'static str = "task";
}

/// Marker for lease ids (`lease_...`), which are also the `jti` of JWT credentials.
pub enum LeaseKind {}
impl IdKind for LeaseKind {
    const PREFIX: &'static str = "lease_";
    const NOUN: &'static str = "lease";
}

pub type TaskId = Id<TaskKind>;
pub type LeaseId = Id<LeaseKind>;

const HEX_DIGITS: usize = 32;

impl<K: IdKind> Id<K> {
    /// A fresh id: creation time, then 80 random bits.
    pub fn generate(now: super::UnixMillis) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&now.0.to_be_bytes()[2..]);
        crate::issuer::random::fill(&mut bytes[6..]);
        Id(format!("{}{}", K::PREFIX, hex(&bytes)), PhantomData)
    }

    /// The smallest id generated at `at` or later: a lower bound for "ids created since".
    pub fn first_at(at: super::UnixMillis) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&at.0.max(0).to_be_bytes()[2..]);
        Id(format!("{}{}", K::PREFIX, hex(&bytes)), PhantomData)
    }

    /// Parses an id received in request field `field`.
    pub fn parse(field: &str, text: &str) -> Result<Self, Error> {
        let is_well_formed = text.strip_prefix(K::PREFIX).is_some_and(|digits| {
            digits.len() == HEX_DIGITS
                && digits
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if is_well_formed {
            Ok(Id(text.to_owned(), PhantomData))
        } else if text.is_empty() {
            Err(Error::invalid(field, "is required"))
        } else {
            Err(Error::invalid(
                field,
                format!(
                    "is not a {} id (expected '{}' and {HEX_DIGITS} hex digits)",
                    K::NOUN,
                    K::PREFIX
                ),
            ))
        }
    }

    /// Rebuilds an id read back from the store, where only well-formed ids are written.
    pub fn from_stored(text: String) -> Self {
        Id(text, PhantomData)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id's 32 hex digits, without its prefix.
    pub fn digits(&self) -> &str {
        self.0.strip_prefix(K::PREFIX).unwrap_or(&self.0)
    }

    /// The id whose digits are `digits`, as [`Self::parse`] checks them.
    pub fn from_digits(field: &str, digits: &str) -> Result<Self, Error> {
        Self::parse(field, &format!("{}{digits}", K::PREFIX))
    }

    /// The id's 128 bits, for compact in-memory sets; `None` for a malformed stored id.
    pub fn compact(&self) -> Option<u128> {
        Self::compact_text(&self.0)
    }

    /// The 128 bits of `text`, an id of this kind as stored.
    pub fn compact_text(text: &str) -> Option<u128> {
        u128::from_str_radix(text.strip_prefix(K::PREFIX)?, 16).ok()
    }

    /// The error for an id of this kind that does not exist for the caller.
    pub fn not_found(&self) -> Error {
        Error::NotFound {
            kind: K::NOUN,
            id: self.0.clone(),
        }
    }
}

/// SHA-256 of `bytes` in lowercase hex: the digests requests are recognised and bound by.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Lowercase hex encoding.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(DIGITS[usize::from(byte >> 4)] as char);
        text.push(DIGITS[usize::from(byte & 0xf)] as char);
    }
    text
}

impl<K: IdKind> Clone for Id<K> {
    fn clone(&self) -> Self {
        Id(self.0.clone(), PhantomData)
    }
}
impl<K: IdKind> PartialEq for Id<K> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl<K: IdKind> Eq for Id<K> {}
impl<K: IdKind> std::hash::Hash for Id<K> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}
impl<K: IdKind> fmt::Debug for Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl<K: IdKind> fmt::Display for Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::UnixMillis;

    #[test]
    fn generated_ids_parse_back_and_sort_by_creation_time() {
        let earlier = TaskId::generate(UnixMillis(1_700_000_000_000));
        let later = TaskId::generate(UnixMillis(1_700_000_000_001));
        assert_eq!(TaskId::parse("task_id", earlier.as_str()).unwrap(), earlier);
        assert!(earlier.as_str() < later.as_str());
    }

    #[test]
    fn refuses_ids_of_another_kind_or_shape() {
        let lease = LeaseId::generate(UnixMillis(1));
        for bad in [
            lease.as_str(),
            "task_",
            "task_0123",
            "task_0123456789ABCDEF0123456789abcdef",
            "",
        ] {
            let error = TaskId::parse("task_id", bad).unwrap_err();
            assert!(error.to_string().starts_with("task_id: "), "{error}");
        }
    }
}
