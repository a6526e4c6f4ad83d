//! The revocation feed as subscribers see it: everything after their cursor from the store, then
//! each new revocation as soon as its transaction commits.
//!
//! Writers call [`Feed::announce`] after commit; subscribers wake on that and read the store, so
//! the store stays the single source of truth and a slow subscriber never holds memory for
//! others. A periodic re-read also picks up revocations committed by other replicas sharing the
//! database.

use std::time::Duration;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::domain::UnixMillis;
use crate::metrics::Metrics;

use crate::store::{FeedRecord, Store};

/// Events read from the store per round trip.
const PAGE_SIZE: i64 = 500;
/// How often a subscriber re-reads the store without an announcement (other replicas' writes).
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Announces committed revocations to subscribers in this process.
pub struct Feed {
    head: watch::Sender<i64>,
    metrics: Arc<Metrics>,
}

/// A page of the feed for one subscriber.
#[derive(Debug)]
pub struct FeedBatch {
    pub records: Vec<FeedRecord>,
    /// Where to resume after this batch.
    pub cursor: i64,
    /// Whether everything recorded when the subscription started has now been delivered.
    pub caught_up: bool,
}

impl Feed {
    pub fn new(head: i64, metrics: Arc<Metrics>) -> Self {
        Feed {
            head: watch::Sender::new(head),
            metrics,
        }
    }

    /// Tells subscribers that events up to `seq` are committed.
    pub fn announce(&self, seq: i64) {
        self.head.send_if_modified(|head| {
            let is_newer = seq > *head;
            if is_newer {
                *head = seq;
            }
            is_newer
        });
    }

    /// Streams batches after `cursor` until the receiver is dropped or `shutdown` turns true.
    /// The first batch that reaches the head known at subscription has `caught_up` set (it may
    /// be empty); later batches follow new revocations.
    pub fn subscribe(
        &self,
        store: Store,
        mut cursor: i64,
        mut shutdown: watch::Receiver<bool>,
    ) -> mpsc::Receiver<Result<FeedBatch, crate::error::Error>> {
        let (sender, receiver) = mpsc::channel(4);
        let mut announcements = self.head.subscribe();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut has_caught_up = false;
            loop {
                announcements.mark_unchanged();
                let records = match store.feed_after(cursor, PAGE_SIZE).await {
                    Ok(records) => records,
                    Err(error) => {
                        let _ = sender.send(Err(error)).await;
                        return;
                    }
                };
                let is_last_page = records.len() < PAGE_SIZE as usize;
                if let Some(last) = records.last() {
                    cursor = last.seq;
                }
                if has_caught_up {
                    // Live delivery (not a replay of history): how long after commit it left.
                    let now = UnixMillis::now();
                    for record in &records {
                        let delay = (now.0 - record.event.occurred_at.0).max(0) as f64 / 1000.0;
                        metrics.feed_delivery_seconds.observe(delay);
                    }
                }
                let announce_catch_up = is_last_page && !has_caught_up;
                if !records.is_empty() || announce_catch_up {
                    has_caught_up |= announce_catch_up;
                    let batch = FeedBatch {
                        records,
                        cursor,
                        caught_up: has_caught_up,
                    };
                    if sender.send(Ok(batch)).await.is_err() {
                        return;
                    }
                }
                if is_last_page {
                    tokio::select! {
                        _ = announcements.changed() => {}
                        _ = tokio::time::sleep(POLL_INTERVAL) => {}
                        _ = sender.closed() => return,
                        _ = shutdown.wait_for(|stopping| *stopping) => return,
                    }
                }
            }
        });
        receiver
    }
}
