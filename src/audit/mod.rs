//! The tamper-evident audit trail: what every request, decision, issuance, use and revocation
//! leaves behind, and how its integrity is checked.
//!
//! An event is written in the same transaction as the change it records, so there is no action
//! without its event. Events are written *unsealed*; [`sealer`] then numbers them and chains each
//! to its predecessor's hash, and periodically signs a checkpoint of the chain head. Sealing after
//! commit keeps the issuance path free of any global lock (several replicas can write at once),
//! at the price of a short window (the sealing interval) during which a fresh event is not yet
//! chained. Secrets never enter an event: where an investigator must match one, the event holds
//! its HMAC-SHA256 under a key derived from the master key ([`AuditKey`]).

pub mod chain;
pub mod sealer;
pub mod verify;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

use crate::domain::UnixMillis;

/// The actor name of the expiry reaper.
pub const REAPER: &str = "warrant/reaper";
/// The actor name of first-start set-up.
pub const BOOTSTRAP: &str = "warrant/bootstrap";
/// The actor of what a signal to the process did (SIGHUP reloads policy).
pub const SIGNAL: &str = "warrant/signal";

/// An event to be written with the action it records.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEvent {
    pub id: String,
    pub occurred_at: UnixMillis,
    pub event_type: &'static str,
    pub outcome: &'static str,
    pub actor: String,
    /// The workload the event concerns; `None` fills in the task's owner.
    pub workload: Option<String>,
    pub task_id: Option<String>,
    pub scope: Option<String>,
    pub lease_id: Option<String>,
    pub detail: Value,
    /// The task's context as JSON ([`TaskContext::to_json`]); `None` fills in the context
    /// recorded with the task.
    pub context: Option<Arc<str>>,
}

impl AuditEvent {
    /// An event of `event_type` with `outcome`, caused by `actor`, happening now.
    pub fn new(event_type: &'static str, outcome: &'static str, actor: impl Into<String>) -> Self {
        let occurred_at = UnixMillis::now();
        AuditEvent {
            id: event_id(occurred_at),
            occurred_at,
            event_type,
            outcome,
            actor: actor.into(),
            workload: None,
            task_id: None,
            scope: None,
            lease_id: None,
            detail: Value::Object(Default::default()),
            context: None,
        }
    }

    pub fn task(mut self, task_id: impl fmt::Display) -> Self {
        self.task_id = Some(task_id.to_string());
        self
    }

    pub fn scope(mut self, scope: impl fmt::Display) -> Self {
        self.scope = Some(scope.to_string());
        self
    }

    pub fn lease(mut self, lease_id: impl fmt::Display) -> Self {
        self.lease_id = Some(lease_id.to_string());
        self
    }

    pub fn workload(mut self, workload: impl fmt::Display) -> Self {
        self.workload = Some(workload.to_string());
        self
    }

    pub fn context(mut self, context_json: &Arc<str>) -> Self {
        self.context = Some(context_json.clone());
        self
    }

    /// Adds `key: value` to the event's detail.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        if let Value::Object(detail) = &mut self.detail {
            detail.insert(key.to_owned(), value.into());
        }
        self
    }
}

/// A time-ordered event id: the creation millisecond, a per-process counter (so events made in
/// one millisecond, such as those of one transaction, keep their order) and random bits.
fn event_id(at: UnixMillis) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&at.0.to_be_bytes()[2..]);
    bytes[6..10].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    crate::issuer::random::fill(&mut bytes[10..]);
    format!("evt_{}", crate::domain::ids::hex(&bytes))
}

/// The key that turns secrets into matchable, irreversible values for the trail.
pub struct AuditKey(ring::hmac::Key);

impl AuditKey {
    pub fn new(key: ring::hmac::Key) -> Self {
        AuditKey(key)
    }

    /// `hmac-sha256:<hex>` of `secret`: the same secret always gives the same value, and the
    /// value reveals nothing of the secret to anyone without the master key.
    pub fn hash(&self, secret: &str) -> String {
        let tag = ring::hmac::sign(&self.0, secret.as_bytes());
        format!("hmac-sha256:{}", crate::domain::ids::hex(tag.as_ref()))
    }
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditKey([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_made_in_sequence_sort_in_sequence() {
        let at = UnixMillis(1_700_000_000_000);
        let ids: Vec<String> = (0..100).map(|_| event_id(at)).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
    }

    #[test]
    fn audit_hash_is_stable_keyed_and_hides_the_secret() {
        let key =
            |byte: u8| AuditKey::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[byte; 32]));
        let value = key(1).hash("wrt_secret");
        assert_eq!(value, key(1).hash("wrt_secret"));
        assert_ne!(value, key(2).hash("wrt_secret"));
        assert!(value.starts_with("hmac-sha256:") && !value.contains("secret"));
    }
}
