//! Change notifications: who must look again after a write commits.
//!
//! A notification carries no data: it says "this kind of state changed, read the store". The
//! store stays the one source of truth, a slow reader holds no memory for others, and a lost
//! notification costs only latency, because every reader also re-reads on a timer. Local writes
//! notify as soon as they commit; on PostgreSQL the writes of other replicas arrive through
//! `LISTEN/NOTIFY` (see `postgres::replicas`).

use tokio::sync::watch;

/// A kind of state that readers follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// The revocation feed gained events.
    Feed,
    /// Signing keys were added or retired.
    Keys,
    /// Workloads or their credentials changed.
    Workloads,
    /// Jobs were queued.
    Jobs,
    /// Grant requests were made, approved, denied or ended.
    Approvals,
}

impl Topic {
    pub const ALL: [Topic; 5] = [
        Topic::Feed,
        Topic::Keys,
        Topic::Workloads,
        Topic::Jobs,
        Topic::Approvals,
    ];

    /// The name sent between replicas.
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Feed => "feed",
            Topic::Keys => "keys",
            Topic::Workloads => "workloads",
            Topic::Jobs => "jobs",
            Topic::Approvals => "approvals",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Topic::ALL.into_iter().find(|topic| topic.as_str() == text)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One counter per topic, bumped on every change; readers wait for it to move.
#[derive(Debug)]
pub struct Changes {
    counters: [watch::Sender<u64>; Topic::ALL.len()],
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            counters: std::array::from_fn(|_| watch::Sender::new(0)),
        }
    }
}

impl Changes {
    /// Wakes everyone following `topic`.
    pub fn notify(&self, topic: Topic) {
        self.counters[topic.index()].send_modify(|count| *count = count.wrapping_add(1));
    }

    /// A receiver whose `changed()` resolves at the next change of `topic`.
    pub fn subscribe(&self, topic: Topic) -> watch::Receiver<u64> {
        self.counters[topic.index()].subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_round_trip() {
        for topic in Topic::ALL {
            assert_eq!(Topic::parse(topic.as_str()), Some(topic));
        }
        assert_eq!(Topic::parse("nonsense"), None);
    }

    #[tokio::test]
    async fn a_subscriber_wakes_on_its_topic_only() {
        let changes = Changes::default();
        let mut feed = changes.subscribe(Topic::Feed);
        let mut keys = changes.subscribe(Topic::Keys);
        changes.notify(Topic::Feed);
        assert!(feed.has_changed().unwrap());
        assert!(!keys.has_changed().unwrap());
        feed.mark_unchanged();
        keys.mark_unchanged();
    }
}
