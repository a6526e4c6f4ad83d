//! Which leases and tasks have ended, in memory, so that introspection needs no database read.
//!
//! A token that verified (signature, issuer, audience, expiry) is live unless its lease or its
//! task has ended: every credential handed out has a stored lease, a lease only ever leaves the
//! `issued` state, and each ending is an event on the revocation feed. So the set of ended
//! leases and tasks, each kept until the tokens it concerns have expired anyway, answers
//! introspection exactly, provided it holds every ending that has committed.
//!
//! The replica that commits an ending adds it after the commit and before answering anyone, so
//! it is exact there. Endings committed by other replicas (PostgreSQL) arrive through the feed,
//! which the store follows; while it cannot vouch for having followed it closely (its listener
//! is down, the feed is held back, reads fail), [`RevocationState::is_current`] says so and the
//! store answers from the database instead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::records::FeedEvent;
use crate::domain::{LeaseId, TaskId, UnixMillis};

/// How long after the last confirmed catch-up the followed state still counts as current.
pub const FOLLOW_STALE_AFTER: Duration = Duration::from_secs(2);
/// How long the feed may hold committed events back (behind an older, unfinished transaction)
/// before the followed state stops counting as current.
pub const HELD_BACK_STALE_AFTER: Duration = Duration::from_millis(500);

/// How the state learns about endings.
#[derive(Debug)]
enum Source {
    /// Every ending is made by this process (SQLite, whose file one broker holds).
    OwnWritesOnly,
    /// Endings also come from other replicas, through the followed feed.
    Followed(Mutex<FollowStatus>),
}

#[derive(Debug, Default)]
struct FollowStatus {
    /// Since when the listener has been up (`None`: down).
    listening_since: Option<Instant>,
    /// When the last read that reached the end of the visible feed began.
    caught_up_at: Option<Instant>,
    /// The oldest committed-but-held-back feed position, and since when it has been waiting.
    held_back: Option<(u64, Instant)>,
}

#[derive(Debug, Default)]
struct Ended {
    /// Lease or task id bits -> the instant after which its tokens have expired anyway.
    leases: HashMap<u128, i64>,
    tasks: HashMap<u128, i64>,
}

/// Ended leases and tasks, kept while their tokens could still be valid.
#[derive(Debug)]
pub struct RevocationState {
    ended: Mutex<Ended>,
    source: Source,
}

impl RevocationState {
    /// A state for a store that makes every ending itself.
    pub fn own_writes_only() -> Self {
        RevocationState {
            ended: Mutex::default(),
            source: Source::OwnWritesOnly,
        }
    }

    /// A state that also follows other replicas' endings; not current until the follower has
    /// caught up for the first time.
    pub fn followed() -> Self {
        RevocationState {
            ended: Mutex::default(),
            source: Source::Followed(Mutex::default()),
        }
    }

    /// Adds endings (from this replica's commits or from the feed; adding twice is harmless).
    pub fn record(&self, events: &[FeedEvent]) {
        if events.is_empty() {
            return;
        }
        let mut ended = self.lock();
        for event in events {
            let Some(task) = TaskId::compact_text(&event.task_id) else {
                continue;
            };
            let (map, key) = match &event.lease_id {
                Some(lease) => match LeaseId::compact_text(lease) {
                    Some(key) => (&mut ended.leases, key),
                    None => continue,
                },
                None => (&mut ended.tasks, task),
            };
            let not_after = map.entry(key).or_insert(event.not_after.0);
            *not_after = (*not_after).max(event.not_after.0);
        }
    }

    /// Whether the lease, or the task it belongs to, has ended.
    pub fn has_ended(&self, lease: &LeaseId, task: &TaskId) -> bool {
        let ended = self.lock();
        lease
            .compact()
            .is_some_and(|key| ended.leases.contains_key(&key))
            || task
                .compact()
                .is_some_and(|key| ended.tasks.contains_key(&key))
    }

    /// Forgets endings whose tokens have all expired before `horizon`.
    pub fn prune(&self, horizon: UnixMillis) {
        let mut ended = self.lock();
        ended.leases.retain(|_, not_after| *not_after >= horizon.0);
        ended.tasks.retain(|_, not_after| *not_after >= horizon.0);
    }

    /// How many endings are held (leases, tasks).
    pub fn len(&self) -> (usize, usize) {
        let ended = self.lock();
        (ended.leases.len(), ended.tasks.len())
    }

    /// Whether the state holds every ending committed up to a moment ago.
    pub fn is_current(&self) -> bool {
        match &self.source {
            Source::OwnWritesOnly => true,
            Source::Followed(status) => {
                let status = status.lock().unwrap_or_else(|p| p.into_inner());
                status.listening_since.is_some()
                    && status
                        .caught_up_at
                        .is_some_and(|at| at.elapsed() < FOLLOW_STALE_AFTER)
                    && status
                        .held_back
                        .is_none_or(|(_, since)| since.elapsed() < HELD_BACK_STALE_AFTER)
            }
        }
    }

    /// The follower's listener for other replicas' changes is up (or has just gone down).
    /// Reads that began before it came up vouch for nothing: a change could have been
    /// announced, unheard, between such a read and the listener's start.
    pub fn set_listening(&self, is_listening: bool) {
        self.update_follow(|status| {
            status.listening_since = is_listening.then(Instant::now);
            status.caught_up_at = None;
        });
    }

    /// The follower has read the feed up to what is visible now, `held_back` naming the oldest
    /// committed position it could not read yet (behind an unfinished older transaction).
    /// `read_started` is when that read began: only endings committed before it are vouched for.
    pub fn set_caught_up(&self, read_started: Instant, held_back: Option<u64>) {
        self.update_follow(|status| {
            if status
                .listening_since
                .is_none_or(|since| read_started < since)
            {
                return;
            }
            status.caught_up_at = Some(
                status
                    .caught_up_at
                    .map_or(read_started, |at| at.max(read_started)),
            );
            status.held_back = match (held_back, status.held_back) {
                (None, _) => None,
                (Some(cursor), Some((waiting, since))) if waiting == cursor => {
                    Some((cursor, since))
                }
                (Some(cursor), _) => Some((cursor, read_started)),
            };
        });
    }

    fn update_follow(&self, change: impl FnOnce(&mut FollowStatus)) {
        if let Source::Followed(status) = &self.source {
            change(&mut status.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ended> {
        self.ended
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RevocationReason;

    fn lease_event(lease: &LeaseId, task: &TaskId, not_after: i64) -> FeedEvent {
        FeedEvent {
            lease_id: Some(lease.as_str().to_owned()),
            task_id: task.as_str().to_owned(),
            scope: None,
            audience: None,
            reason: RevocationReason::Revoked,
            not_after: UnixMillis(not_after),
            occurred_at: UnixMillis(0),
        }
    }

    #[test]
    fn an_ended_lease_or_task_is_known_until_its_tokens_expire() {
        let state = RevocationState::own_writes_only();
        let (task, other_task) = (
            TaskId::generate(UnixMillis(1)),
            TaskId::generate(UnixMillis(1)),
        );
        let (lease, sibling) = (
            LeaseId::generate(UnixMillis(1)),
            LeaseId::generate(UnixMillis(1)),
        );
        state.record(&[lease_event(&lease, &task, 5_000)]);
        assert!(state.has_ended(&lease, &task));
        assert!(!state.has_ended(&sibling, &task), "only the revoked lease");
        let other_lease = lease_event(&sibling, &other_task, 9_000);
        state.record(&[super::super::records::task_ended(
            other_task.as_str(),
            RevocationReason::TaskCompleted,
            &[other_lease],
            UnixMillis(0),
        )]);
        assert!(
            state.has_ended(&sibling, &other_task),
            "every lease of an ended task"
        );
        state.prune(UnixMillis(6_000));
        assert!(!state.has_ended(&lease, &task), "forgotten once expired");
        assert!(state.has_ended(&sibling, &other_task));
    }

    #[test]
    fn a_followed_state_is_current_only_while_listening_caught_up_and_not_held_back() {
        let state = RevocationState::followed();
        let before_listening = Instant::now();
        assert!(!state.is_current(), "not before the first catch-up");
        state.set_listening(true);
        state.set_caught_up(before_listening, None);
        assert!(
            !state.is_current(),
            "a read older than the listener vouches for nothing"
        );
        let first_read = Instant::now();
        state.set_caught_up(first_read, None);
        assert!(state.is_current());
        state.set_caught_up(first_read, Some(7));
        std::thread::sleep(HELD_BACK_STALE_AFTER + Duration::from_millis(50));
        state.set_caught_up(Instant::now(), Some(7));
        assert!(!state.is_current(), "the same position held back too long");
        state.set_caught_up(Instant::now(), None);
        assert!(state.is_current());
        state.set_listening(false);
        assert!(
            !state.is_current(),
            "a lost listener may have missed changes"
        );
    }
}
