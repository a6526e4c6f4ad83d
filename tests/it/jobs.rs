//! The job runner on the store's durable queue: failures retried with backoff until the job
//! succeeds, and two replicas sharing one queue running each job once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use warrant::domain::UnixMillis;
use warrant::jobs::{Handlers, JobHandler};
use warrant::store::{ClaimedJob, NewJob, SharedStore, StoreSettings};

use crate::support::*;

backend_tests!(a_failing_job_is_retried_with_backoff_until_it_succeeds);

/// Counts attempts per job and fails each job's first `failures` attempts.
struct Flaky {
    failures: u32,
    attempts: Mutex<HashMap<String, u32>>,
}

#[async_trait]
impl JobHandler for Flaky {
    async fn run(&self, job: &ClaimedJob) -> Result<(), String> {
        let mut attempts = self.attempts.lock().unwrap();
        let count = attempts.entry(job.id.clone()).or_default();
        *count += 1;
        if *count <= self.failures {
            Err(format!("backend refused attempt {count}"))
        } else {
            Ok(())
        }
    }
}

fn flaky(failures: u32) -> Arc<Flaky> {
    Arc::new(Flaky {
        failures,
        attempts: Mutex::new(HashMap::new()),
    })
}

fn start_runner(store: SharedStore, handler: Arc<Flaky>) -> watch::Sender<bool> {
    let mut handlers = Handlers::default();
    handlers.register("test.flaky", handler);
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(warrant::jobs::run(store, handlers, shutdown));
    stop
}

async fn a_failing_job_is_retried_with_backoff_until_it_succeeds(backend: Backend) {
    let data = TestData::new(backend).await;
    let store = warrant::store::open(&data.database_url, StoreSettings::default())
        .await
        .unwrap();
    let handler = flaky(2);
    let _runner = start_runner(store.clone(), handler.clone());
    let job = NewJob::new("test.flaky", serde_json::json!({}), UnixMillis::now());

    store.enqueue_jobs(vec![job.clone()], vec![]).await.unwrap();

    assert!(
        eventually(Duration::from_secs(2), || async {
            store
                .pending_jobs(10)
                .await
                .unwrap()
                .first()
                .is_some_and(|pending| {
                    pending.attempts == 1
                        && pending.last_error.as_deref() == Some("backend refused attempt 1")
                })
        })
        .await,
        "the failure is kept on the job for operators"
    );
    assert!(
        eventually(Duration::from_secs(8), || async {
            store.pending_jobs(10).await.unwrap().is_empty()
        })
        .await,
        "done after the third attempt (1 s, then 2 s of backoff)"
    );
    assert_eq!(handler.attempts.lock().unwrap().get(&job.id), Some(&3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn two_replicas_run_each_job_once() {
    let data = TestData::new(Backend::Postgres).await;
    let open = || warrant::store::open(&data.database_url, StoreSettings::default());
    let (first, second) = (open().await.unwrap(), open().await.unwrap());
    let (first_handler, second_handler) = (flaky(0), flaky(0));
    let _runners = (
        start_runner(first.clone(), first_handler.clone()),
        start_runner(second.clone(), second_handler.clone()),
    );
    let jobs: Vec<NewJob> = (0..60)
        .map(|n| {
            NewJob::new(
                "test.flaky",
                serde_json::json!({ "n": n }),
                UnixMillis::now(),
            )
        })
        .collect();

    first.enqueue_jobs(jobs.clone(), vec![]).await.unwrap();

    assert!(
        eventually(Duration::from_secs(10), || async {
            first.pending_jobs(100).await.unwrap().is_empty()
        })
        .await,
        "every job done"
    );
    let (first_runs, second_runs) = (
        first_handler.attempts.lock().unwrap().clone(),
        second_handler.attempts.lock().unwrap().clone(),
    );
    for job in &jobs {
        let runs = first_runs.get(&job.id).copied().unwrap_or(0)
            + second_runs.get(&job.id).copied().unwrap_or(0);
        assert_eq!(runs, 1, "job {} ran {runs} times", job.id);
    }
}
