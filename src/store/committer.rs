//! Group commit: concurrent writes share one transaction, and so one disk flush.
//!
//! A durable commit costs a flush to disk (SQLite `synchronous=FULL`) or a WAL flush (PostgreSQL),
//! which bounds a broker that commits each request alone to the disk's flush rate. Instead, hot
//! writes are queued; a committer takes every write waiting, applies them together (see
//! [`batch`](super::batch): rows of all writes merged into a few statements), commits once, and
//! only then answers each caller. No caller is answered before its changes are durable.
//!
//! If a statement of a batch fails, the batch is rolled back and each write is applied again in
//! a transaction of its own, so one bad write (or a PostgreSQL deadlock between two batches)
//! fails only its own caller. A failed commit is not retried: whether it took effect is unknown,
//! so every caller of that batch gets the error.
//!
//! SQLite runs one committer (it has one writer connection); PostgreSQL runs several, each on
//! its own connection, since the server flushes concurrent commits together anyway.

use std::sync::Arc;

use sqlx::AnyPool;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::batch::{self, Outcome, Write};
use crate::error::{Error, Result};

/// The most writes one transaction carries.
const MAX_BATCH: usize = 512;

/// A write waiting for its batch, with where to send its outcome.
struct Pending {
    write: Write,
    reply: oneshot::Sender<Result<Outcome>>,
}

/// The queue of hot writes.
#[derive(Clone, Debug)]
pub struct Committer {
    writes: mpsc::UnboundedSender<Pending>,
}

impl Committer {
    /// Starts `committers` tasks writing through `pool`.
    pub fn start(pool: AnyPool, committers: usize) -> Self {
        let (writes, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..committers {
            tokio::spawn(run(pool.clone(), receiver.clone()));
        }
        Committer { writes }
    }

    /// Queues `write` and returns its outcome once the transaction carrying it has committed.
    pub(super) async fn submit(&self, write: Write) -> Result<Outcome> {
        let (reply, outcome) = oneshot::channel();
        self.writes
            .send(Pending { write, reply })
            .map_err(|_| Error::internal("the store is closed"))?;
        outcome
            .await
            .map_err(|_| Error::internal("the store stopped before committing"))?
    }
}

/// One committer: waits for a write, takes every write waiting behind it, commits them together.
async fn run(pool: AnyPool, receiver: Arc<Mutex<mpsc::UnboundedReceiver<Pending>>>) {
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
        commit(&pool, writes, replies).await;
    }
}

/// Why a transaction did not commit.
enum Failure {
    /// A statement failed; nothing took effect.
    Statement(Error),
    /// The commit itself failed; whether it took effect is unknown.
    Commit(sqlx::Error),
}

async fn commit(
    pool: &AnyPool,
    writes: Vec<Write>,
    replies: Vec<oneshot::Sender<Result<Outcome>>>,
) {
    match apply_and_commit(pool, &writes).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(Failure::Statement(error)) if writes.len() > 1 => {
            tracing::warn!(%error, writes = writes.len(), "batch failed; applying its writes one by one");
            for (write, reply) in writes.into_iter().zip(replies) {
                let outcome = match apply_and_commit(pool, std::slice::from_ref(&write)).await {
                    Ok(mut outcomes) => outcomes
                        .pop()
                        .ok_or_else(|| Error::internal("a write produced no outcome")),
                    Err(failure) => Err(failure.into()),
                };
                let _ = reply.send(outcome);
            }
        }
        Err(Failure::Statement(error)) => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(error));
            }
        }
        Err(Failure::Commit(error)) => {
            let cause = error.to_string();
            tracing::error!(error = %cause, writes = writes.len(), "group commit failed");
            for reply in replies {
                let _ = reply.send(Err(Error::internal(format!("commit failed: {cause}"))));
            }
        }
    }
}

impl From<Failure> for Error {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Statement(error) => error,
            Failure::Commit(error) => Error::internal(format!("commit failed: {error}")),
        }
    }
}

/// Applies `writes` in one transaction and commits it.
async fn apply_and_commit(pool: &AnyPool, writes: &[Write]) -> Result<Vec<Outcome>, Failure> {
    let mut transaction = pool
        .begin()
        .await
        .map_err(|error| Failure::Statement(error.into()))?;
    let outcomes = batch::apply(&mut transaction, writes)
        .await
        .map_err(Failure::Statement)?;
    transaction.commit().await.map_err(Failure::Commit)?;
    Ok(outcomes)
}
