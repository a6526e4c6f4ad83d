//! Authenticated workload credentials, answered from memory until a workload changes.
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

/// Credential id -> (when read, stored secret hash, workload).
type Entries = HashMap<String, (Instant, Vec<u8>, WorkloadRecord)>;

pub struct CredentialCache {
    store: SharedStore,
    entries: Mutex<Entries>,
    workload_changes: Mutex<watch::Receiver<u64>>,
}

impl CredentialCache {
    pub fn new(store: SharedStore) -> Self {
        let workload_changes = Mutex::new(store.changes().subscribe(Topic::Workloads));
        CredentialCache {
            store,
            entries: Mutex::default(),
            workload_changes,
        }
    }

    /// The workload holding the unrevoked credential `credential_id`, with the credential's
    /// secret hash for the caller to compare. Unknown ids are not cached.
    pub async fn find(&self, credential_id: &str) -> Result<Option<(Vec<u8>, WorkloadRecord)>> {
        let now = Instant::now();
        {
            let mut entries = self.entries();
            if self.workloads_changed() {
                entries.clear();
            }
            if let Some((read_at, secret, workload)) = entries.get(credential_id)
                && now.duration_since(*read_at) < CREDENTIAL_CACHE_TTL
            {
                return Ok(Some((secret.clone(), workload.clone())));
            }
        }
        let found = self.store.find_credential(credential_id).await?;
        if let Some((secret, workload)) = &found {
            let mut entries = self.entries();
            if entries.len() >= CREDENTIAL_CACHE_ENTRIES {
                entries.clear();
            }
            entries.insert(
                credential_id.to_owned(),
                (now, secret.clone(), workload.clone()),
            );
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
