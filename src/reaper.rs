//! The expiry reaper: periodically marks leases and tasks whose time has passed as expired and
//! reports them on the revocation feed. It also runs once at start, for everything that expired
//! while the broker was down.

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

/// Sweeps every `interval` until `shutdown` turns true.
pub async fn run(broker: Arc<Broker>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
        sweep(&broker).await;
    }
}
