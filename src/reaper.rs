//! Housekeeping on a timer: the expiry reaper marks leases and tasks whose time has passed as
//! expired and reports them on the revocation feed (it also runs once at start, for everything
//! that expired while the broker was down); signing keys and CAs are reloaded when a replica
//! sharing the database rotates them; and endings whose tokens have all expired are forgotten, in
//! memory and in the revocation feed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::broker::Broker;
use crate::domain::UnixMillis;
use crate::store::Topic;

/// Runs one sweep; logs rather than fails, so a passing database error does not stop reaping.
pub async fn sweep(broker: &Broker) {
    match broker.expire_due().await {
        Ok((0, 0)) => {}
        Ok((leases, tasks)) => tracing::info!(leases, tasks, "expired"),
        Err(error) => tracing::warn!(%error, "expiry sweep failed; retrying at the next tick"),
    }
}

/// How often the signing keys are re-read without a notification of a change.
const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(30);
/// How often endings whose tokens have all expired are forgotten.
const PRUNE_INTERVAL: Duration = Duration::from_secs(30);
/// How long an ending is kept after its tokens expired, for clocks that differ a little.
const PRUNE_MARGIN: Duration = Duration::from_secs(60);

/// Sweeps every `interval`, reloads the signing keys on a change (and every
/// [`KEY_RELOAD_INTERVAL`]) and prunes the revocation state, until `shutdown` turns true.
pub async fn run(broker: Arc<Broker>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut sweeps = tokio::time::interval(interval);
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut key_reloads = tokio::time::interval(KEY_RELOAD_INTERVAL);
    key_reloads.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prunes = tokio::time::interval(PRUNE_INTERVAL);
    prunes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut key_changes = broker.store().changes().subscribe(Topic::Keys);
    loop {
        let chore = tokio::select! {
            _ = sweeps.tick() => Chore::Sweep,
            _ = key_reloads.tick() => Chore::ReloadKeys,
            changed = key_changes.changed() => match changed {
                Ok(()) => Chore::ReloadKeys,
                Err(_) => return,
            },
            _ = prunes.tick() => Chore::Prune,
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        };
        match chore {
            Chore::Sweep => sweep(&broker).await,
            Chore::ReloadKeys => reload_keys(&broker).await,
            Chore::Prune => {
                let horizon = UnixMillis(UnixMillis::now().0 - PRUNE_MARGIN.as_millis() as i64);
                broker.store().revocations().prune(horizon);
                prune_feed(&broker, horizon).await;
            }
        }
    }
}

/// What a tick of the housekeeping loop asks for.
enum Chore {
    Sweep,
    ReloadKeys,
    Prune,
}

/// Events deleted from the revocation feed per statement, so pruning never holds the writer
/// for long.
const FEED_PRUNE_BATCH: usize = 2000;

/// Deletes the feed events whose tokens all expired before `horizon`, a batch at a time.
async fn prune_feed(broker: &Broker, horizon: UnixMillis) {
    let mut pruned = 0;
    loop {
        match broker.store().prune_feed(horizon, FEED_PRUNE_BATCH).await {
            Ok(deleted) => {
                pruned += deleted;
                if deleted < FEED_PRUNE_BATCH as u64 {
                    break;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "pruning the revocation feed failed; retrying later");
                break;
            }
        }
    }
    if pruned > 0 {
        tracing::debug!(
            pruned,
            "pruned revocation feed events whose tokens have expired"
        );
    }
}

/// Reloads the signing keys and the CAs, adopting another replica's rotation (and dropping a
/// retired CA from the bundle once its time is over), and rotates a CA close to its expiry.
async fn reload_keys(broker: &Broker) {
    if let Err(error) = broker.keyring().reload(broker.store().as_ref()).await {
        tracing::warn!(%error, "signing key reload failed; keeping the loaded keys");
    }
    if let Err(error) = broker.ca().reload(broker.store().as_ref()).await {
        tracing::warn!(%error, "trust bundle reload failed; keeping the loaded CAs");
    }
    if let Err(error) = broker.rotate_expiring_ca(UnixMillis::now()).await {
        tracing::warn!(%error, "the CA expires soon and rotating it failed; retrying later");
    }
}
