//! The broker's signing keys in memory: the current key (parsed once, shared by every request),
//! the next key, and the public keys still published.
//!
//! The next key is published in the JWKS before it signs anything: a rotation promotes it and
//! makes a new next key, so a verifier that fetched the JWKS a moment before a rotation already
//! knows the key that signs after it. A reload takes the current key from the store's state
//! (activated, not retired), so it can never put a retired key back into use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::keys::{Jwk, KeyAlgorithm, SigningKey, VerifyingKey};
use super::master_key::MasterKey;
use crate::audit::{AuditEvent, BOOTSTRAP};
use crate::domain::UnixMillis;
use crate::error::{Error, Result};
use crate::store::{Store, StoredSigningKey};

/// The keys as of the last load or rotation.
struct KeySet {
    current: Arc<SigningKey>,
    /// The key the next rotation promotes.
    next: Arc<SigningKey>,
    /// Every published key by kid, with the instant it stops being published (`None`: current).
    published: HashMap<String, (VerifyingKey, Option<UnixMillis>)>,
}

/// Shared access to the signing keys.
pub struct Keyring {
    keys: RwLock<Arc<KeySet>>,
    master_key: Arc<MasterKey>,
    algorithm: KeyAlgorithm,
    /// When a miss last caused a reload.
    last_reload: Mutex<Option<Instant>>,
}

/// The shortest interval between two reloads caused by unknown key ids, so that tokens with
/// made-up kids cannot turn introspection into a stream of database reads.
const RELOAD_ON_MISS_INTERVAL: Duration = Duration::from_secs(1);

/// What a rotation did.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub new_kid: String,
    pub retired_kid: String,
    pub retired_key_published_until: UnixMillis,
}

impl Keyring {
    /// Loads the published keys, generating and storing a first key (of `algorithm`) on a fresh
    /// store. New keys made by rotation also use `algorithm`.
    pub async fn load(
        store: &dyn Store,
        master_key: Arc<MasterKey>,
        algorithm: KeyAlgorithm,
    ) -> Result<Self> {
        let now = UnixMillis::now();
        let mut stored = store.published_signing_keys(now).await?;
        // A fresh store gets both keys; a store from before next keys existed gets a next key.
        for (role, missing) in [
            ("current", !stored.iter().any(StoredSigningKey::is_current)),
            ("next", !stored.iter().any(StoredSigningKey::is_next)),
        ] {
            if !missing {
                continue;
            }
            let activated_at = (role == "current").then_some(now);
            let (key, record) = new_key(&master_key, algorithm, now, activated_at);
            let event = AuditEvent::new("signing_key.generated", "ok", BOOTSTRAP)
                .with("kid", key.kid())
                .with("algorithm", algorithm.jws_name())
                .with("role", role);
            store
                .insert_signing_key(record.clone(), vec![event])
                .await?;
            tracing::info!(
                kid = key.kid(),
                algorithm = algorithm.jws_name(),
                role,
                "generated signing key"
            );
            stored.insert(0, record);
        }
        let keys = key_set(&master_key, &stored)?;
        Ok(Keyring {
            keys: RwLock::new(Arc::new(keys)),
            master_key,
            algorithm,
            last_reload: Mutex::new(None),
        })
    }

    /// Re-reads the published keys from the store, adopting a key another replica rotated to.
    pub async fn reload(&self, store: &dyn Store) -> Result<()> {
        let stored = store.published_signing_keys(UnixMillis::now()).await?;
        let kid_of = |is: fn(&StoredSigningKey) -> bool| {
            stored
                .iter()
                .find(|key| is(key))
                .map(|key| key.kid.as_str())
        };
        let snapshot = self.snapshot();
        if kid_of(StoredSigningKey::is_current) == Some(snapshot.current.kid())
            && kid_of(StoredSigningKey::is_next) == Some(snapshot.next.kid())
            && stored.len() == snapshot.published.len()
        {
            return Ok(());
        }
        let keys = key_set(&self.master_key, &stored)?;
        tracing::info!(current_kid = keys.current.kid(), "reloaded signing keys");
        *self
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(keys);
        Ok(())
    }

    /// Like [`Keyring::verifying_key`], but on a miss first reloads the keys from the store (at
    /// most once per second), for tokens signed by a key another replica has just made.
    pub async fn find_verifying_key(
        &self,
        store: &dyn Store,
        kid: &str,
        now: UnixMillis,
    ) -> Result<Option<VerifyingKey>> {
        if let Some(key) = self.verifying_key(kid, now) {
            return Ok(Some(key));
        }
        let is_reload_due = {
            let mut last = self
                .last_reload
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let is_due = last.is_none_or(|at| at.elapsed() >= RELOAD_ON_MISS_INTERVAL);
            if is_due {
                *last = Some(Instant::now());
            }
            is_due
        };
        if !is_reload_due {
            return Ok(None);
        }
        self.reload(store).await?;
        Ok(self.verifying_key(kid, now))
    }

    /// The key that signs new tokens.
    pub fn current(&self) -> Arc<SigningKey> {
        self.snapshot().current.clone()
    }

    /// The published key with id `kid`, if it is still published at `now`.
    pub fn verifying_key(&self, kid: &str, now: UnixMillis) -> Option<VerifyingKey> {
        let keys = self.snapshot();
        let (key, until) = keys.published.get(kid)?;
        until.is_none_or(|until| now < until).then(|| key.clone())
    }

    /// The JWKS at `now`: the current key first, the next key second, then every other key
    /// still published.
    pub fn jwks(&self, now: UnixMillis) -> Vec<Jwk> {
        let keys = self.snapshot();
        let mut jwks = vec![
            keys.current.verifying_key().to_jwk(),
            keys.next.verifying_key().to_jwk(),
        ];
        jwks.extend(
            keys.published
                .values()
                .filter(|(key, until)| {
                    key.kid != keys.current.kid()
                        && key.kid != keys.next.kid()
                        && until.is_none_or(|until| now < until)
                })
                .map(|(key, _)| key.to_jwk()),
        );
        jwks
    }

    /// Promotes the next key to current and makes a new next key. The retired key stays published until every token it may have
    /// signed has expired: the later of the latest lease it signed and `longest_token_ttl` from
    /// now (which covers tokens being signed while the rotation runs).
    /// `actor` (an admin) is recorded as the cause.
    pub async fn rotate(
        &self,
        store: &dyn Store,
        longest_token_ttl: Duration,
        actor: &str,
    ) -> Result<Rotation> {
        let now = UnixMillis::now();
        let snapshot = self.snapshot();
        let (retired, promoted) = (snapshot.current.clone(), snapshot.next.clone());
        let latest_signed = store
            .latest_expiry_signed_by(retired.kid())
            .await?
            .unwrap_or(now);
        let publish_until = latest_signed.max(now.plus(longest_token_ttl));
        let (next, record) = new_key(&self.master_key, self.algorithm, now, None);
        let event = AuditEvent::new("signing_key.rotated", "ok", actor)
            .with("new_kid", promoted.kid())
            .with("next_kid", next.kid())
            .with("retired_kid", retired.kid())
            .with("retired_key_published_until", publish_until.0);
        store
            .rotate_signing_key(
                record,
                promoted.kid(),
                retired.kid(),
                publish_until,
                vec![event],
            )
            .await?;
        let mut published = snapshot.published.clone();
        published.insert(
            retired.kid().to_owned(),
            (retired.verifying_key().clone(), Some(publish_until)),
        );
        published.insert(next.kid().to_owned(), (next.verifying_key().clone(), None));
        let rotation = Rotation {
            new_kid: promoted.kid().to_owned(),
            retired_kid: retired.kid().to_owned(),
            retired_key_published_until: publish_until,
        };
        *self
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(KeySet {
            current: promoted,
            next: Arc::new(next),
            published,
        });
        tracing::info!(new_kid = %rotation.new_kid, retired_kid = %rotation.retired_kid, "rotated signing key");
        Ok(rotation)
    }

    fn snapshot(&self) -> Arc<KeySet> {
        // A poisoned lock only means a writer panicked after the swap was built; the Arc inside
        // is always a complete key set.
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// A fresh key, stored as current when `activated_at` is set, else as the next key.
fn new_key(
    master_key: &MasterKey,
    algorithm: KeyAlgorithm,
    now: UnixMillis,
    activated_at: Option<UnixMillis>,
) -> (SigningKey, StoredSigningKey) {
    let (key, pkcs8) = SigningKey::generate(algorithm);
    let record = StoredSigningKey {
        kid: key.kid().to_owned(),
        algorithm,
        public_key: key.verifying_key().public_key.clone(),
        sealed_private_key: master_key.seal(key.kid().as_bytes(), &pkcs8),
        created_at: now,
        activated_at,
        retired_at: None,
        publish_until: None,
    };
    (key, record)
}

/// Builds the in-memory key set from stored keys (newest first): unseals the current and the
/// next key and checks that each stored public key matches its kid.
fn key_set(master_key: &MasterKey, stored: &[StoredSigningKey]) -> Result<KeySet> {
    let unseal = |role: &str, is: fn(&StoredSigningKey) -> bool| -> Result<SigningKey> {
        let record = stored
            .iter()
            .filter(|key| is(key))
            .max_by_key(|key| (key.activated_at, key.created_at))
            .ok_or_else(|| Error::internal(format!("no {role} signing key in the store")))?;
        let pkcs8 = master_key
            .open(record.kid.as_bytes(), &record.sealed_private_key)
            .map_err(Error::internal)?;
        let key = SigningKey::from_pkcs8(record.algorithm, &pkcs8).map_err(Error::internal)?;
        if key.kid() != record.kid {
            return Err(Error::internal(format!(
                "signing key {} does not match its kid",
                record.kid
            )));
        }
        Ok(key)
    };
    let current = unseal("current", StoredSigningKey::is_current)?;
    let next = unseal("next", StoredSigningKey::is_next)?;
    let mut published = HashMap::new();
    for record in stored {
        let key = VerifyingKey::new(record.algorithm, record.public_key.clone());
        if key.kid != record.kid {
            return Err(Error::internal(format!(
                "public key {} does not match its kid",
                record.kid
            )));
        }
        let until = if record.retired_at.is_none() {
            None
        } else {
            record.publish_until
        };
        published.insert(record.kid.clone(), (key, until));
    }
    Ok(KeySet {
        current: Arc::new(current),
        next: Arc::new(next),
        published,
    })
}
