//! The writer thread: the one connection that writes, and group commit.
//!
//! SQLite serializes writers, so the store has exactly one write connection, owned by a thread
//! of its own. Writes are closures sent to that thread through a bounded queue. The thread takes
//! every write waiting, applies them one after another in one transaction, commits once, and
//! only then records the batch's endings in the revocation state, announces its changes and
//! answers each caller: one hand-off per batch, one disk flush per batch, statements run
//! synchronously with cached prepared statements, and no caller is answered before its changes
//! are durable.
//!
//! A write that fails must roll back alone. Savepoints would give that, but they cost every
//! write a statement journal of the pages it touches; since a failing write is rare, a batch is
//! first applied without them, and only if one of its writes fails is it rolled back and applied
//! again with a savepoint around each write (writes are closures that can run twice: they decide
//! on the same rolled-back state both times).
//!
//! Being the only writer, the thread also knows the audit chain's head at all times, so events
//! are chained as they are written (see `audit::insert_events`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::audit::{self, AuditHead};
use crate::error::{Error, Result};
use crate::store::records::FeedEvent;
use crate::store::{Changes, RevocationState, Topic};

/// The most writes one transaction carries.
const MAX_BATCH: usize = 512;

/// What a write can use inside its savepoint, and what it leaves for after the commit.
pub struct Write<'c> {
    pub connection: &'c Connection,
    /// The audit chain's head as of this write (writes chain their events onto it).
    pub head: AuditHead,
    /// Endings to record in the revocation state once the batch has committed.
    pub ended: Vec<FeedEvent>,
    /// Changes to announce once the batch has committed.
    pub topics: Vec<Topic>,
}

/// A write waiting for its batch.
trait Job: Send {
    /// Runs the write; whether it succeeded (its outcome is kept until the commit). May run
    /// again after its batch was rolled back.
    fn apply(&mut self, write: &mut Write<'_>) -> bool;
    /// Answers the caller once the batch's fate is known.
    fn finish(self: Box<Self>, commit: Result<(), &Error>);
}

struct TypedJob<T, F> {
    work: F,
    outcome: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Send,
    F: FnMut(&mut Write<'_>) -> Result<T> + Send,
{
    fn apply(&mut self, write: &mut Write<'_>) -> bool {
        let outcome = (self.work)(write);
        let is_ok = outcome.is_ok();
        self.outcome = Some(outcome);
        is_ok
    }

    fn finish(self: Box<Self>, commit: Result<(), &Error>) {
        let answer = match (self.outcome, commit) {
            (Some(Err(error)), _) => Err(error),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (Some(Ok(_)), Err(error)) => Err(commit_failed(error)),
            (None, Err(error)) => Err(commit_failed(error)),
            (None, Ok(())) => Err(Error::internal("a write was never applied")),
        };
        let _ = self.reply.send(answer);
    }
}

/// A batch that could not commit; its callers learn only that (the cause goes to the log).
fn commit_failed(error: &Error) -> Error {
    match error {
        Error::Unavailable(message) => Error::Unavailable(message.clone()),
        other => Error::internal(format!("the batch did not commit: {other}")),
    }
}

enum Message {
    Job(Box<dyn Job>),
    Stop,
}

/// The handle through which writes reach the writer thread.
pub struct Writer {
    queue: mpsc::Sender<Message>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    timeout: Duration,
}

/// What the writer thread updates after each commit.
pub struct AfterCommit {
    pub revocations: Arc<RevocationState>,
    pub changes: Arc<Changes>,
}

impl Writer {
    /// Starts the writer thread on `connection`, whose chain head is `head`.
    pub fn start(
        connection: Connection,
        head: AuditHead,
        after_commit: AfterCommit,
        queue_bound: usize,
        timeout: Duration,
    ) -> std::io::Result<Self> {
        let (queue, receiver) = mpsc::channel(queue_bound.max(1));
        let thread = std::thread::Builder::new()
            .name("warrant-sqlite-writer".into())
            .spawn(move || run(connection, head, receiver, after_commit))?;
        Ok(Writer {
            queue,
            thread: Mutex::new(Some(thread)),
            timeout,
        })
    }

    /// Queues `work` and returns its outcome once the transaction carrying it has committed.
    /// Refused at once when the queue is full; `UNAVAILABLE` when the commit takes too long.
    pub async fn run<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Write<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, outcome) = oneshot::channel();
        let job = TypedJob {
            work,
            outcome: None,
            reply,
        };
        self.queue
            .try_send(Message::Job(Box::new(job)))
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

    /// Lets the writes already queued commit, then stops the thread.
    pub async fn stop(&self) {
        let _ = self.queue.send(Message::Stop).await;
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The writer thread: waits for a write, takes every write waiting behind it, commits them
/// together, until told to stop.
fn run(
    mut connection: Connection,
    mut head: AuditHead,
    mut receiver: mpsc::Receiver<Message>,
    after_commit: AfterCommit,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    let mut is_stopping = false;
    while !is_stopping {
        match receiver.blocking_recv() {
            Some(Message::Job(job)) => batch.push(job),
            Some(Message::Stop) | None => break,
        }
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(Message::Job(job)) => batch.push(job),
                Ok(Message::Stop) => {
                    is_stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        commit_batch(&mut connection, &mut head, &mut batch, &after_commit);
    }
}

fn commit_batch(
    connection: &mut Connection,
    head: &mut AuditHead,
    batch: &mut Vec<Box<dyn Job>>,
    after_commit: &AfterCommit,
) {
    match apply_and_commit(connection, head, batch) {
        Ok((ended, topics)) => {
            after_commit.revocations.record(&ended);
            let mut announced: Vec<Topic> = Vec::with_capacity(topics.len());
            for topic in topics {
                if !announced.contains(&topic) {
                    after_commit.changes.notify(topic);
                    announced.push(topic);
                }
            }
            for job in batch.drain(..) {
                job.finish(Ok(()));
            }
        }
        Err(error) => {
            tracing::error!(%error, writes = batch.len(), "SQLite batch did not commit");
            // The chain head in the database is what the next batch must build on.
            match audit::read_head(connection) {
                Ok(stored) => *head = stored,
                Err(read_error) => {
                    tracing::error!(error = %read_error, "cannot re-read the audit chain head")
                }
            }
            for job in batch.drain(..) {
                job.finish(Err(&error));
            }
        }
    }
}

/// Applies `batch` in one transaction and commits; returns the endings and changes of the writes
/// that succeeded. Without savepoints first; if a write fails, again with one around each.
fn apply_and_commit(
    connection: &mut Connection,
    head: &mut AuditHead,
    batch: &mut [Box<dyn Job>],
) -> Result<(Vec<FeedEvent>, Vec<Topic>)> {
    if let Some(applied) = apply(connection, head, batch, Isolation::Batch)? {
        return Ok(applied);
    }
    apply(connection, head, batch, Isolation::EachWrite)?
        .ok_or_else(|| Error::internal("a write failed inside its own savepoint"))
}

/// What a write that succeeded leaves for its batch.
struct Applied {
    head: AuditHead,
    ended: Vec<FeedEvent>,
    topics: Vec<Topic>,
}

/// Runs one write on `connection` from `head`; `None` when it failed.
fn run_write(job: &mut dyn Job, connection: &Connection, head: &AuditHead) -> Option<Applied> {
    let mut write = Write {
        connection,
        head: head.clone(),
        ended: Vec::new(),
        topics: Vec::new(),
    };
    job.apply(&mut write).then_some(Applied {
        head: write.head,
        ended: write.ended,
        topics: write.topics,
    })
}

/// How a batch's writes are kept apart.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Isolation {
    /// All in the one transaction: a failing write fails the batch.
    Batch,
    /// Each in a savepoint: a failing write rolls back alone.
    EachWrite,
}

/// One attempt at a batch; `None` (nothing committed) when a write failed and the batch must be
/// applied again with each write isolated.
fn apply(
    connection: &mut Connection,
    head: &mut AuditHead,
    batch: &mut [Box<dyn Job>],
    isolation: Isolation,
) -> Result<Option<(Vec<FeedEvent>, Vec<Topic>)>> {
    let mut transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut batch_head = head.clone();
    let (mut ended, mut topics) = (Vec::new(), Vec::new());
    for job in batch.iter_mut() {
        let applied = match isolation {
            Isolation::Batch => run_write(job.as_mut(), &transaction, &batch_head),
            Isolation::EachWrite => {
                let savepoint = transaction.savepoint()?;
                let applied = run_write(job.as_mut(), &savepoint, &batch_head);
                match applied {
                    Some(_) => savepoint.commit()?,
                    None => savepoint.finish()?,
                }
                applied
            }
        };
        match applied {
            Some(write) => {
                batch_head = write.head;
                ended.extend(write.ended);
                topics.extend(write.topics);
            }
            // Dropping the transaction rolls the whole batch back.
            None if isolation == Isolation::Batch => return Ok(None),
            None => {}
        }
    }
    if batch_head != *head {
        audit::write_head(&transaction, &batch_head)?;
    }
    transaction.commit()?;
    *head = batch_head;
    Ok(Some((ended, topics)))
}
