//! Authenticated workload credentials and X.509-SVIDs, answered from memory until a workload
//! changes.
//!
//! Every call authenticates, and workloads and credentials rarely change, so a credential found
//! in the store is kept here. Any change to workloads, on this replica or (through the store's
//! notifications) on another, empties the cache before the next look-up, so a revoked
//! credential stops working as soon as the change is known. A time limit bounds how long an
//! entry can outlive a change whose notification was lost.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::error::Result;
use crate::store::{SharedStore, Topic, WorkloadRecord};

/// The longest an entry is answered from memory.
pub const CREDENTIAL_CACHE_TTL: Duration = Duration::from_secs(10);
/// Credentials kept at most (the cache starts over beyond).
const CREDENTIAL_CACHE_ENTRIES: usize = 10_000;

/// What authenticates a caller: a credential's secret hash, or an SVID's expiry.
#[derive(Clone)]
enum Proof {
    SecretHash(Vec<u8>),
    ValidUntil(crate::domain::UnixMillis),
}

/// Credential id (or `x5t:` + SVID thumbprint) -> (when read, proof, workload).
type Entries = HashMap<String, (Instant, Proof, WorkloadRecord)>;

pub struct CredentialCache {
    store: SharedStore,
    /// Whether bearer credentials authenticate at all.
    bearer_allowed: bool,
    entries: Mutex<Entries>,
    workload_changes: Mutex<watch::Receiver<u64>>,
}

impl CredentialCache {
    pub fn new(store: SharedStore, bearer_allowed: bool) -> Self {
        let workload_changes = Mutex::new(store.changes().subscribe(Topic::Workloads));
        CredentialCache {
            store,
            bearer_allowed,
            entries: Mutex::default(),
            workload_changes,
        }
    }

    pub fn bearer_allowed(&self) -> bool {
        self.bearer_allowed
    }

    /// The workload holding the unrevoked credential `credential_id`, with the credential's
    /// secret hash for the caller to compare. Unknown ids are not cached.
    pub async fn find(&self, credential_id: &str) -> Result<Option<(Vec<u8>, WorkloadRecord)>> {
        let found = self
            .cached(credential_id.to_owned(), || async {
                let found = self.store.find_credential(credential_id).await?;
                Ok(found.map(|(secret, workload)| (Proof::SecretHash(secret), workload)))
            })
            .await?;
        Ok(match found {
            Some((Proof::SecretHash(secret), workload)) => Some((secret, workload)),
            _ => None,
        })
    }

    /// The workload holding the unrevoked X.509-SVID with `thumbprint`, while it is unexpired:
    /// checked on every call, since a TLS connection outlives its handshake.
    pub async fn find_svid(&self, thumbprint: &str) -> Result<Option<WorkloadRecord>> {
        let found = self
            .cached(format!("x5t:{thumbprint}"), || async {
                let found = self.store.find_svid(thumbprint).await?;
                Ok(found.map(|(svid, workload)| (Proof::ValidUntil(svid.expires_at), workload)))
            })
            .await?;
        let now = crate::domain::UnixMillis::now();
        Ok(match found {
            Some((Proof::ValidUntil(until), workload)) if until > now => Some(workload),
            _ => None,
        })
    }

    /// The entry under `key`, from memory while fresh, else from `load` (kept if found).
    async fn cached<F, Load>(
        &self,
        key: String,
        load: Load,
    ) -> Result<Option<(Proof, WorkloadRecord)>>
    where
        Load: FnOnce() -> F,
        F: Future<Output = Result<Option<(Proof, WorkloadRecord)>>>,
    {
        let now = Instant::now();
        {
            let mut entries = self.entries();
            if self.workloads_changed() {
                entries.clear();
            }
            if let Some((read_at, proof, workload)) = entries.get(&key)
                && now.duration_since(*read_at) < CREDENTIAL_CACHE_TTL
            {
                return Ok(Some((proof.clone(), workload.clone())));
            }
        }
        let found = load().await?;
        if let Some((proof, workload)) = &found {
            let mut entries = self.entries();
            if entries.len() >= CREDENTIAL_CACHE_ENTRIES {
                entries.clear();
            }
            entries.insert(key, (now, proof.clone(), workload.clone()));
        }
        Ok(found)
    }

    /// Whether workloads changed since the last look-up (and marks the change seen).
    fn workloads_changed(&self) -> bool {
        let mut changes = self
            .workload_changes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let has_changed = changes.has_changed().unwrap_or(true);
        changes.mark_unchanged();
        has_changed
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
