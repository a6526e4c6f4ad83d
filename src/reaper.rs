//! The expiry reaper: periodically marks leases and tasks whose time has passed as expired and
//! reports them on the revocation feed. It also runs once at start, for everything that expired
//! while the broker was down. The same loop re-reads the signing keys now and then, so replicas
//! sharing one database follow each other's rotations.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::broker::Broker;

/// Runs one sweep; logs rather than fails, so a passing database error does not stop reaping.
pub async fn sweep(broker: &Broker) {
    match broker.expire_due().await {
        Ok((0, 0)) => {}
        Ok((leases, tasks)) => tracing::info!(leases, tasks, "expired"),
        Err(error) => tracing::warn!(%error, "expiry sweep failed; retrying at the next tick"),
    }
}

/// How often the signing keys are re-read, to adopt a rotation made by another replica.
const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(30);

/// Sweeps every `interval`, and reloads the signing keys every [`KEY_RELOAD_INTERVAL`], until
/// `shutdown` turns true.
pub async fn run(broker: Arc<Broker>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut sweeps = tokio::time::interval(interval);
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut key_reloads = tokio::time::interval(KEY_RELOAD_INTERVAL);
    key_reloads.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let is_key_reload = tokio::select! {
            _ = sweeps.tick() => false,
            _ = key_reloads.tick() => true,
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        };
        if !is_key_reload {
            sweep(&broker).await;
        } else if let Err(error) = broker.keyring().reload(broker.store()).await {
            tracing::warn!(%error, "signing key reload failed; keeping the loaded keys");
        }
    }
}
