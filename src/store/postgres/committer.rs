//! The PostgreSQL group-commit queue: several committers, each on its own pooled connection,
//! take every hot write waiting and commit them together (see [`batch`]); the server flushes
//! their concurrent commits together too.
//!
//! If a statement of a batch fails, the batch is rolled back and each write is applied again in
//! a transaction of its own, so one bad write fails only its own caller. A deadlock or
//! serialization failure is retried as a whole (nothing committed). A failed commit is not
//! retried: whether it took effect is unknown, so every caller of that batch gets the error.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{Acquire, PgPool};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::batch::{self, Outcome, Write};
use super::replicas::Announcer;
use super::retry::{ATTEMPTS, is_conflict, pause};
use crate::error::{Error, Result};
use crate::store::records::FeedEvent;
use crate::store::{RevocationState, Topic};

/// The most writes one transaction carries.
const MAX_BATCH: usize = 512;

struct Pending {
    write: Write,
    reply: oneshot::Sender<Result<Outcome>>,
}

/// What committers update after each commit, before answering.
#[derive(Clone)]
pub struct AfterCommit {
    pub revocations: Arc<RevocationState>,
    pub announcer: Announcer,
}

/// The queue of hot writes.
pub struct Committer {
    /// Taken away on close, which ends the committers once they have drained the queue.
    queue: std::sync::Mutex<Option<mpsc::Sender<Pending>>>,
    timeout: Duration,
}

impl Committer {
    /// Starts `committers` tasks writing through `pool`.
    pub fn start(
        pool: PgPool,
        committers: usize,
        queue_bound: usize,
        timeout: Duration,
        after_commit: AfterCommit,
    ) -> (Self, Vec<JoinHandle<()>>) {
        let (queue, receiver) = mpsc::channel(queue_bound.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        let tasks = (0..committers)
            .map(|_| tokio::spawn(run(pool.clone(), receiver.clone(), after_commit.clone())))
            .collect();
        let queue = std::sync::Mutex::new(Some(queue));
        (Committer { queue, timeout }, tasks)
    }

    /// Queues `write` and returns its outcome once the transaction carrying it has committed.
    pub async fn submit(&self, write: Write) -> Result<Outcome> {
        let (reply, outcome) = oneshot::channel();
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .ok_or_else(|| Error::Unavailable("the store is closed".into()))?;
        queue
            .try_send(Pending { write, reply })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => Error::ResourceExhausted(
                    "the store's write queue is full; retry with backoff".into(),
                ),
                mpsc::error::TrySendError::Closed(_) => {
                    Error::Unavailable("the store is closed".into())
                }
            })?;
        match tokio::time::timeout(self.timeout, outcome).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Error::Unavailable(
                "the store stopped before committing".into(),
            )),
            Err(_) => Err(Error::Unavailable(format!(
                "the database did not commit within {}s",
                self.timeout.as_secs()
            ))),
        }
    }

    /// Stops taking writes: the committers commit what is queued, then end.
    pub fn close(&self) {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
    }
}

async fn run(
    pool: PgPool,
    receiver: Arc<Mutex<mpsc::Receiver<Pending>>>,
    after_commit: AfterCommit,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            let mut receiver = receiver.lock().await;
            if receiver.recv_many(&mut batch, MAX_BATCH).await == 0 {
                return;
            }
        }
        let (writes, replies): (Vec<Write>, Vec<_>) = batch
            .drain(..)
            .map(|pending| (pending.write, pending.reply))
            .unzip();
        commit(&pool, writes, replies, &after_commit).await;
    }
}

/// Why a transaction did not commit.
enum Failure {
    /// A statement failed; nothing took effect.
    Statement(Error),
    /// The commit itself failed; whether it took effect is unknown.
    Commit(Error),
}

impl From<Failure> for Error {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Statement(error) | Failure::Commit(error) => error,
        }
    }
}

async fn commit(
    pool: &PgPool,
    writes: Vec<Write>,
    replies: Vec<oneshot::Sender<Result<Outcome>>>,
    after_commit: &AfterCommit,
) {
    match apply_and_commit(pool, &writes).await {
        Ok((outcomes, ended)) => {
            published(after_commit, &ended);
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(Failure::Statement(error)) if writes.len() > 1 => {
            tracing::warn!(%error, writes = writes.len(), "batch failed; applying its writes one by one");
            for (write, reply) in writes.into_iter().zip(replies) {
                let outcome = match apply_and_commit(pool, std::slice::from_ref(&write)).await {
                    Ok((mut outcomes, ended)) => {
                        published(after_commit, &ended);
                        outcomes
                            .pop()
                            .ok_or_else(|| Error::internal("a write produced no outcome"))
                    }
                    Err(failure) => Err(failure.into()),
                };
                let _ = reply.send(outcome);
            }
        }
        Err(failure) => {
            let error = Error::from(failure);
            tracing::error!(%error, writes = writes.len(), "group commit failed");
            let cause = error.to_string();
            for reply in replies {
                let _ = reply.send(Err(match &error {
                    Error::Unavailable(message) => Error::Unavailable(message.clone()),
                    _ => Error::internal(format!("commit failed: {cause}")),
                }));
            }
        }
    }
}

/// Records a committed batch's endings and tells the replicas, before anyone is answered.
fn published(after_commit: &AfterCommit, ended: &[FeedEvent]) {
    if !ended.is_empty() {
        after_commit.revocations.record(ended);
        after_commit.announcer.announce(Topic::Feed);
    }
}

/// Applies `writes` in one transaction and commits it, again when PostgreSQL aborts it to
/// resolve a conflict.
async fn apply_and_commit(
    pool: &PgPool,
    writes: &[Write],
) -> Result<(Vec<Outcome>, Vec<FeedEvent>), Failure> {
    let mut attempt = 1;
    loop {
        let mut connection = pool
            .acquire()
            .await
            .map_err(|error| Failure::Statement(error.into()))?;
        let mut transaction = connection
            .begin()
            .await
            .map_err(|error| Failure::Statement(error.into()))?;
        match batch::apply(&mut transaction, writes).await {
            Ok(applied) => {
                return transaction
                    .commit()
                    .await
                    .map(|()| applied)
                    .map_err(|error| Failure::Commit(error.into()));
            }
            Err(error) if attempt < ATTEMPTS && is_conflict(&error) => {
                drop(transaction);
                tracing::debug!(%error, attempt, "batch conflicted; retrying");
                pause(attempt).await;
                attempt += 1;
            }
            Err(error) => return Err(Failure::Statement(error)),
        }
    }
}
