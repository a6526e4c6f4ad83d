//! The job runner: takes due jobs from the store's durable queue and runs them with the handler
//! registered for their kind, retrying failures with exponential backoff, forever.
//!
//! Each replica runs one. A job is claimed for [`CLAIM_DURATION`] and the claim is extended
//! while its handler works, so no other runner takes it meanwhile; a runner that dies lets the
//! claim lapse and another takes the job again (see `store::jobs`). Handlers must be
//! idempotent. A failure is logged with the job's id and kept on the job for operators
//! (`Store::pending_jobs`); the job runs again after [`retry_delay`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::domain::UnixMillis;
use crate::store::jobs::retry_delay;
use crate::store::{ClaimedJob, JobOutcome, SharedStore, Topic};

/// How long a claim holds before it lapses, unless extended.
pub const CLAIM_DURATION: Duration = Duration::from_secs(30);
/// How often the runner looks for due jobs without a notification.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Jobs run at once by one runner.
const CONCURRENCY: usize = 8;

/// Runs the jobs of one kind.
#[async_trait]
pub trait JobHandler: Send + Sync {
    /// Does the job; an error means "try again later" and is shown to operators.
    async fn run(&self, job: &ClaimedJob) -> Result<(), String>;
}

/// The handlers of every job kind this broker runs.
#[derive(Clone, Default)]
pub struct Handlers(HashMap<String, Arc<dyn JobHandler>>);

impl Handlers {
    pub fn register(&mut self, kind: impl Into<String>, handler: Arc<dyn JobHandler>) {
        self.0.insert(kind.into(), handler);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Claims and runs due jobs until `shutdown` turns true.
pub async fn run(store: SharedStore, handlers: Handlers, mut shutdown: watch::Receiver<bool>) {
    if handlers.is_empty() {
        return;
    }
    let kinds: Vec<String> = handlers.0.keys().cloned().collect();
    let mut job_changes = store.changes().subscribe(Topic::Jobs);
    loop {
        job_changes.mark_unchanged();
        let claimed = match store
            .claim_jobs(&kinds, CONCURRENCY, CLAIM_DURATION, UnixMillis::now())
            .await
        {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(%error, "cannot claim jobs; retrying");
                Vec::new()
            }
        };
        let is_full = claimed.len() == CONCURRENCY;
        let mut attempts = tokio::task::JoinSet::new();
        for job in claimed {
            if let Some(handler) = handlers.0.get(&job.kind) {
                attempts.spawn(attempt(store.clone(), handler.clone(), job));
            }
        }
        attempts.join_all().await;
        if is_full {
            continue;
        }
        tokio::select! {
            _ = job_changes.changed() => {}
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
    }
}

/// Runs one claimed job, extending its claim while it works, and records how it ended.
async fn attempt(store: SharedStore, handler: Arc<dyn JobHandler>, job: ClaimedJob) {
    let work = handler.run(&job);
    tokio::pin!(work);
    let mut extensions = tokio::time::interval(CLAIM_DURATION / 3);
    extensions.tick().await;
    let result = loop {
        tokio::select! {
            result = &mut work => break result,
            _ = extensions.tick() => {
                let until = UnixMillis::now().plus(CLAIM_DURATION);
                if !matches!(store.extend_job_claim(&job, until).await, Ok(true)) {
                    tracing::warn!(job_id = %job.id, kind = %job.kind, "lost the claim on a running job");
                }
            }
        }
    };
    let outcome = match result {
        Ok(()) => JobOutcome::Done,
        Err(error) => {
            let delay = retry_delay(job.attempts);
            tracing::warn!(job_id = %job.id, kind = %job.kind, attempts = job.attempts, %error,
                retry_in_seconds = delay.as_secs(), "job failed; it will run again");
            JobOutcome::Failed {
                retry_at: UnixMillis::now().plus(delay),
                error,
            }
        }
    };
    match store.finish_job(&job, outcome).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(job_id = %job.id, "the job's claim lapsed before it finished; another runner has it")
        }
        Err(error) => {
            tracing::warn!(job_id = %job.id, %error, "cannot record the job's outcome; it will run again")
        }
    }
}
