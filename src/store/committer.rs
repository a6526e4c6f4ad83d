//! Group commit: concurrent writes share one transaction, and so one disk flush.
//!
//! A durable commit costs a flush to disk (SQLite `synchronous=FULL`) or a WAL flush (PostgreSQL),
//! which bounds a broker that commits each request alone to the disk's flush rate. Instead, hot
//! writes are queued as jobs; a committer takes every job waiting, runs each inside its own
//! savepoint of one transaction (so a failing job rolls back alone), commits once, and only then
//! answers each caller. No caller is answered before its changes are durable.
//!
//! SQLite runs one committer (it has one writer connection); PostgreSQL runs several, each on
//! its own connection, since the server flushes concurrent commits together anyway.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sqlx::AnyPool;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::{Error, Result};

/// The most jobs one transaction carries.
const MAX_BATCH: usize = 256;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Delivers a job's outcome once the batch's commit has succeeded or failed.
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A job's work on the batch's connection; says whether it succeeded (else its savepoint is
/// rolled back) and how to answer its caller.
type Job =
    Box<dyn for<'c> FnOnce(&'c mut sqlx::AnyConnection) -> BoxFuture<'c, (bool, Reply)> + Send>;

/// The queue of hot writes.
#[derive(Clone, Debug)]
pub struct Committer {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Committer {
    /// Starts `committers` tasks writing through `pool`.
    pub fn start(pool: AnyPool, committers: usize) -> Self {
        let (jobs, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..committers {
            tokio::spawn(run(pool.clone(), receiver.clone()));
        }
        Committer { jobs }
    }

    /// Runs `work` in a shared transaction and returns its result once that has committed.
    pub async fn write<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut sqlx::AnyConnection) -> BoxFuture<'c, Result<T>> + Send + 'static,
    {
        let (sender, receiver) = oneshot::channel::<Result<T>>();
        let job: Job = Box::new(move |connection| {
            Box::pin(async move {
                let outcome = work(connection).await;
                let succeeded = outcome.is_ok();
                let reply: Reply = Box::new(move |committed| {
                    let answer = match committed {
                        Ok(()) => outcome,
                        Err(cause) => Err(Error::internal(format!("commit failed: {cause}"))),
                    };
                    let _ = sender.send(answer);
                });
                (succeeded, reply)
            })
        });
        self.jobs
            .send(job)
            .map_err(|_| Error::internal("the store is closed"))?;
        receiver
            .await
            .map_err(|_| Error::internal("the store stopped before committing"))?
    }
}

/// One committer: waits for a job, takes every job waiting behind it, commits them together.
async fn run(pool: AnyPool, receiver: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>) {
    loop {
        let mut batch = Vec::new();
        {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        commit_batch(&pool, batch).await;
    }
}

async fn commit_batch(pool: &AnyPool, batch: Vec<Job>) {
    let mut replies = Vec::with_capacity(batch.len());
    let outcome = run_batch(pool, batch, &mut replies).await;
    let committed = outcome.map_err(|error| {
        tracing::error!(%error, jobs = replies.len(), "group commit failed");
        error.to_string()
    });
    for reply in replies {
        reply(committed.clone());
    }
}

/// Runs every job of `batch` in one transaction, each in its own savepoint, and commits.
fn run_batch<'a>(
    pool: &'a AnyPool,
    batch: Vec<Job>,
    replies: &'a mut Vec<Reply>,
) -> BoxFuture<'a, Result<(), sqlx::Error>> {
    Box::pin(async move {
        let mut transaction = pool.begin().await?;
        for job in batch {
            statement(&mut transaction, "SAVEPOINT job").await?;
            let (succeeded, reply) = job(&mut transaction).await;
            if !succeeded {
                statement(&mut transaction, "ROLLBACK TO SAVEPOINT job").await?;
            }
            statement(&mut transaction, "RELEASE SAVEPOINT job").await?;
            replies.push(reply);
        }
        transaction.commit().await
    })
}

fn statement<'c>(
    connection: &'c mut sqlx::AnyConnection,
    sql: &'static str,
) -> BoxFuture<'c, Result<(), sqlx::Error>> {
    Box::pin(async move { sqlx::query(sql).execute(connection).await.map(|_| ()) })
}
