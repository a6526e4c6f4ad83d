//! The background sealer: chains new events shortly after they commit (on PostgreSQL; SQLite
//! chains them as it writes them), and signs a checkpoint of the chain head now and then with
//! the broker's signing key.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::chain::checkpoint_message;
use crate::broker::Broker;
use crate::domain::UnixMillis;
use crate::error::Result;
use crate::store::Checkpoint;

/// Events sealed per transaction: bounds how long one sealing holds the writer.
const SEAL_BATCH: usize = 500;

/// Seals every pending event.
pub async fn seal_all(broker: &Broker) -> Result<usize> {
    let mut sealed = 0;
    loop {
        let count = broker.store().seal_audit_events(SEAL_BATCH).await?;
        broker.metrics().audit_events_sealed.inc_by(count as u64);
        sealed += count;
        if count < SEAL_BATCH {
            return Ok(sealed);
        }
    }
}

/// Signs the current chain head, unless the latest checkpoint already covers it.
pub async fn checkpoint(broker: &Broker) -> Result<Option<i64>> {
    let (seq, head_hash) = broker.store().audit_head().await?;
    let latest = broker
        .store()
        .checkpoints()
        .await?
        .last()
        .map_or(0, |checkpoint| checkpoint.seq);
    if seq == 0 || seq <= latest {
        return Ok(None);
    }
    let key = broker.keyring().current();
    let checkpoint = Checkpoint {
        seq,
        signature: key.sign(&checkpoint_message(seq, &head_hash)),
        head_hash,
        kid: key.kid().to_owned(),
    };
    broker
        .store()
        .insert_checkpoint(checkpoint, UnixMillis::now())
        .await?;
    Ok(Some(seq))
}

/// Seals every `seal_interval` and checkpoints every `checkpoint_interval` until `shutdown`;
/// then seals and checkpoints one last time, so a clean stop leaves the whole trail signed.
pub async fn run(
    broker: Arc<Broker>,
    seal_interval: Duration,
    checkpoint_interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut seals = tokio::time::interval(seal_interval);
    seals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checkpoints = tokio::time::interval(checkpoint_interval);
    checkpoints.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let is_checkpoint = tokio::select! {
            _ = seals.tick() => false,
            _ = checkpoints.tick() => true,
            _ = shutdown.wait_for(|stopping| *stopping) => break,
        };
        let outcome = if is_checkpoint {
            checkpoint(&broker).await.map(|_| ())
        } else {
            seal_all(&broker).await.map(|_| ())
        };
        if let Err(error) = outcome {
            tracing::warn!(%error, "audit sealing failed; retrying at the next tick");
        }
    }
    if let Err(error) = async {
        seal_all(&broker).await?;
        checkpoint(&broker).await
    }
    .await
    {
        tracing::warn!(%error, "final audit sealing failed");
    }
}
