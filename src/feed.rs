//! The revocation feed as subscribers see it: everything after their cursor from the store, then
//! each new revocation as soon as its transaction commits.
//!
//! Subscribers wake on the store's feed notifications (this replica's commits, and on
//! PostgreSQL the other replicas' through `LISTEN/NOTIFY`) and read the store, so the store
//! stays the single source of truth and a slow subscriber never holds memory for others. A
//! periodic re-read covers a notification lost while a listener reconnected.
//!
//! While there is nothing to deliver, a subscriber still receives a heartbeat (an empty batch
//! with the current cursor) every heartbeat interval, each sent right after a read of the store
//! that found nothing new. A verifier that stops hearing them knows its revocation state may be
//! stale (a stopped broker, a half-open connection) instead of silently trusting it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::domain::UnixMillis;
use crate::metrics::Metrics;
use crate::store::{FeedRecord, SharedStore, Topic};

/// Events read from the store per round trip.
const PAGE_SIZE: usize = 500;
/// How often a subscriber re-reads the store without a notification.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How soon a subscriber reads again when the store holds committed events back behind an
/// older, unfinished transaction (PostgreSQL).
const HELD_BACK_RETRY: Duration = Duration::from_millis(2);

/// Serves the revocation feed to subscribers in this process.
pub struct Feed {
    store: SharedStore,
    metrics: Arc<Metrics>,
    heartbeat_interval: Duration,
}

/// A page of the feed for one subscriber.
#[derive(Debug)]
pub struct FeedBatch {
    pub records: Vec<FeedRecord>,
    /// Where to resume after this batch.
    pub cursor: u64,
    /// Whether everything recorded when the subscription started has now been delivered.
    pub caught_up: bool,
}

impl Feed {
    pub fn new(store: SharedStore, metrics: Arc<Metrics>, heartbeat_interval: Duration) -> Self {
        Feed {
            store,
            metrics,
            heartbeat_interval,
        }
    }

    /// How often an idle subscriber receives a heartbeat.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    /// Streams batches after `cursor` until the receiver is dropped or `shutdown` turns true.
    /// The first batch that reaches the end of what the store can vouch for has `caught_up`
    /// set (it may be empty); later batches follow new revocations, with an empty batch every
    /// heartbeat interval while there are none.
    pub fn subscribe(
        &self,
        mut cursor: u64,
        mut shutdown: watch::Receiver<bool>,
    ) -> mpsc::Receiver<Result<FeedBatch, crate::error::Error>> {
        let (sender, receiver) = mpsc::channel(4);
        let store = self.store.clone();
        let mut changes = store.changes().subscribe(Topic::Feed);
        let metrics = self.metrics.clone();
        let heartbeat_interval = self.heartbeat_interval;
        tokio::spawn(async move {
            let mut has_caught_up = false;
            let mut last_sent = Instant::now();
            loop {
                changes.mark_unchanged();
                let page = match store.feed_after(cursor, PAGE_SIZE).await {
                    Ok(page) => page,
                    Err(error) => {
                        let _ = sender.send(Err(error)).await;
                        return;
                    }
                };
                let is_last_page = page.records.len() < PAGE_SIZE;
                cursor = page.cursor;
                if has_caught_up {
                    // Live delivery (not a replay of history): how long after commit it left.
                    let now = UnixMillis::now();
                    for record in &page.records {
                        let delay = (now.0 - record.event.occurred_at.0).max(0) as f64 / 1000.0;
                        metrics.feed_delivery_seconds.observe(delay);
                    }
                }
                let is_complete = is_last_page && !page.is_held_back;
                let announce_catch_up = is_complete && !has_caught_up;
                // A heartbeat only when the read just made vouches for everything committed.
                let heartbeat_due = is_complete && last_sent.elapsed() >= heartbeat_interval;
                if !page.records.is_empty() || announce_catch_up || heartbeat_due {
                    has_caught_up |= announce_catch_up;
                    let batch = FeedBatch {
                        records: page.records,
                        cursor,
                        caught_up: has_caught_up,
                    };
                    if sender.send(Ok(batch)).await.is_err() {
                        return;
                    }
                    last_sent = Instant::now();
                }
                if is_last_page {
                    let wait = if page.is_held_back {
                        HELD_BACK_RETRY
                    } else {
                        POLL_INTERVAL.min(heartbeat_interval.saturating_sub(last_sent.elapsed()))
                    };
                    tokio::select! {
                        _ = changes.changed() => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = sender.closed() => return,
                        _ = shutdown.wait_for(|stopping| *stopping) => return,
                    }
                }
            }
        });
        receiver
    }
}
