//! The PostgreSQL backend: several replicas sharing one database, on sqlx's typed `PgPool`.
//!
//! - Hot writes go through group commit ([`committer`], [`batch`]) with array binds; the other
//!   writes run in their own transactions. No write takes a shared counter row: the feed and
//!   the audit trail are ordered by transaction id and read below the transaction horizon
//!   ([`feed`], [`audit`]).
//! - Rows are locked in one order everywhere (tasks before leases, several tasks in id order),
//!   and a transaction PostgreSQL aborts on a deadlock or serialization failure is retried
//!   ([`retry`]).
//! - Replicas wake each other through `LISTEN/NOTIFY`, poll behind it, and each follows the feed
//!   into its revocation state ([`replicas`]).
//! - Writes that end leases run in tasks of their own, so that a caller who hangs up cannot cut
//!   one short between its commit and its recording in the revocation state.

/// The transaction horizon, as SQL: every transaction below it has committed or aborted.
macro_rules! horizon {
    () => {
        "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
    };
}

mod audit;
mod batch;
mod committer;
mod feed;
mod grants;
mod identity;
mod jobs;
mod keys;
mod migrate;
mod replicas;
mod retry;
mod tasks;
mod workloads;

use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::batch::{Outcome, Write, unexpected};
use self::committer::{AfterCommit, Committer};
use self::replicas::Announcer;
use self::retry::in_transaction;
use super::records::{
    ApiKeyRecord, AuditFilter, AuditRecord, Checkpoint, CompletionOutcome, EndedLease,
    ExpiryReport, FeedEvent, FeedPage, GrantDecision, GrantDecisionOutcome, GrantRequestInsertion,
    GrantRequestRecord, IdentityEnd, JoinTokenRecord, LeaseRecord, NewLeaseOutcome, PendingFilter,
    Renewal, RenewalOutcome, StoredCaKey, StoredJwtSvidKey, StoredSigningKey, SvidRecord,
    TaskInsertion, TaskRecord, WorkloadRecord, ended_leases,
};
use super::{
    Changes, ClaimedJob, JobOutcome, JobRecord, NewJob, RevocationState, Store, StoreError,
    StoreSettings, Topic,
};
use crate::audit::{AuditEvent, REAPER};
use crate::domain::{LeaseId, ScopeName, TaskId, UnixMillis, WorkloadName};
use crate::error::{Error, Result};
use crate::issuer::KeyAlgorithm;
use crate::issuer::credential::StoredCredential;

/// Concurrent group-commit transactions (each holds a pooled connection while it writes; the
/// server flushes their commits together).
const COMMITTERS: usize = 6;
/// Pooled connections: the committers, the replica tasks, and reads.
const POOL_SIZE: u32 = 16;
/// How long a caller waits for a pooled connection before the call fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A replica's handle on the shared database.
pub struct PostgresStore {
    pool: PgPool,
    committer: Committer,
    announcer: Announcer,
    revocations: Arc<RevocationState>,
    changes: Arc<Changes>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl PostgresStore {
    /// Connects, applies migrations, loads the endings introspection must know, and starts
    /// following the other replicas.
    pub async fn open(url: &str, settings: StoreSettings) -> Result<Self, StoreError> {
        let options =
            PgConnectOptions::from_str(url).map_err(|error| StoreError::Open(error.to_string()))?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|error| StoreError::Open(error.to_string()))?;
        {
            let mut connection = pool
                .acquire()
                .await
                .map_err(|error| StoreError::Open(error.to_string()))?;
            migrate::run(&mut connection).await?;
        }
        let revocations = Arc::new(RevocationState::followed());
        let (unexpired, cursor) = feed::unexpired(&pool, UnixMillis::now())
            .await
            .map_err(|error| StoreError::Open(error.to_string()))?;
        revocations.record(&unexpired);
        let changes = Arc::new(Changes::default());
        let (stop, shutdown) = watch::channel(false);
        let (announcer, mut tasks) = replicas::start(
            pool.clone(),
            changes.clone(),
            revocations.clone(),
            cursor,
            shutdown,
        );
        let (committer, committers) = Committer::start(
            pool.clone(),
            COMMITTERS,
            settings.write_queue,
            settings.write_timeout,
            AfterCommit {
                revocations: revocations.clone(),
                announcer: announcer.clone(),
            },
        );
        tasks.extend(committers);
        Ok(PostgresStore {
            pool,
            committer,
            announcer,
            revocations,
            changes,
            stop,
            tasks: Mutex::new(tasks),
        })
    }

    /// Runs a write that ends leases in a task of its own (see the module documentation), then
    /// records its endings and tells the replicas before returning.
    async fn ending<T, F>(&self, write: F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<(T, Vec<FeedEvent>)>> + Send + 'static,
    {
        let revocations = self.revocations.clone();
        let announcer = self.announcer.clone();
        tokio::spawn(async move {
            let (value, ended) = write.await?;
            if !ended.is_empty() {
                revocations.record(&ended);
                announcer.announce(Topic::Feed);
            }
            Ok(value)
        })
        .await
        .map_err(|error| Error::internal(format!("a revocation failed: {error}")))?
    }

    /// Runs `body` in a retried transaction and announces `topic` once it has committed.
    async fn write<T, F>(&self, topic: Topic, body: F) -> Result<T>
    where
        F: for<'c> FnMut(&'c mut sqlx::PgConnection) -> retry::BoxFuture<'c, Result<T>>,
    {
        let value = in_transaction(&self.pool, body).await?;
        self.announcer.announce(topic);
        Ok(value)
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    async fn close(&self) {
        self.committer.close();
        let _ = self.stop.send(true);
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .drain(..)
            .collect();
        for task in tasks {
            let _ = task.await;
        }
        self.pool.close().await;
    }

    fn changes(&self) -> &Changes {
        &self.changes
    }

    fn revocations(&self) -> &RevocationState {
        &self.revocations
    }

    async fn find_task(&self, id: &TaskId, workload_id: &str) -> Result<Option<TaskRecord>> {
        tasks::find_task(&self.pool, id, workload_id).await
    }

    async fn find_task_by_idempotency_key(
        &self,
        workload_id: &str,
        key: &str,
    ) -> Result<Option<TaskRecord>> {
        tasks::find_task_by_idempotency_key(&self.pool, workload_id, key).await
    }

    async fn leases_of_task(&self, id: &TaskId) -> Result<Vec<LeaseRecord>> {
        tasks::leases_of_task(&self.pool, id).await
    }

    async fn set_api_key(
        &self,
        id: &LeaseId,
        secret_sha256: Vec<u8>,
        events: Vec<AuditEvent>,
    ) -> Result<bool> {
        in_transaction(&self.pool, |connection| {
            let (id, secret_sha256, events) = (id.clone(), secret_sha256.clone(), events.clone());
            Box::pin(
                async move { tasks::set_api_key(connection, &id, &secret_sha256, &events).await },
            )
        })
        .await
    }

    async fn find_api_key(&self, id: &LeaseId) -> Result<Option<ApiKeyRecord>> {
        tasks::find_api_key(&self.pool, id).await
    }

    async fn issued_leases_of_scope(
        &self,
        scope: &ScopeName,
        limit: usize,
    ) -> Result<Vec<LeaseId>> {
        tasks::issued_leases_of_scope(&self.pool, scope, limit).await
    }

    async fn find_lease(&self, id: &LeaseId, workload_id: &str) -> Result<Option<LeaseRecord>> {
        tasks::find_lease(&self.pool, id, workload_id).await
    }

    async fn insert_task(
        &self,
        task: TaskRecord,
        leases: Vec<LeaseRecord>,
        events: Vec<AuditEvent>,
    ) -> Result<TaskInsertion> {
        match self
            .committer
            .submit(Write::NewTask {
                task,
                leases,
                events,
            })
            .await?
        {
            Outcome::TaskInserted(insertion) => Ok(insertion),
            other => Err(unexpected(other)),
        }
    }

    async fn add_lease(
        &self,
        workload_id: &str,
        lease: LeaseRecord,
        now: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<NewLeaseOutcome> {
        let write = Write::AddLease {
            workload_id: workload_id.to_owned(),
            lease,
            now,
            events,
        };
        match self.committer.submit(write).await? {
            Outcome::LeaseAdded(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    async fn renew_lease(
        &self,
        renewal: Renewal,
        events: Vec<AuditEvent>,
    ) -> Result<RenewalOutcome> {
        match self
            .committer
            .submit(Write::Renew { renewal, events })
            .await?
        {
            Outcome::Renewed(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    async fn complete_task(
        &self,
        id: &TaskId,
        workload_id: &str,
        now: UnixMillis,
        actor: &str,
    ) -> Result<CompletionOutcome> {
        let write = Write::Complete {
            task_id: id.clone(),
            workload_id: workload_id.to_owned(),
            now,
            actor: actor.to_owned(),
        };
        let completed = match self.committer.submit(write).await? {
            Outcome::Completed(completed) => completed,
            other => return Err(unexpected(other)),
        };
        Ok(match completed {
            Some(revoked) => CompletionOutcome::Completed {
                revoked,
                ended_at: now,
            },
            None => match self.find_task(id, workload_id).await? {
                Some(task) => CompletionOutcome::AlreadyEnded(task),
                None => CompletionOutcome::NotFound,
            },
        })
    }

    async fn revoke_task(
        &self,
        id: &TaskId,
        now: UnixMillis,
        actor: &str,
        events: Vec<AuditEvent>,
    ) -> Result<Option<Vec<EndedLease>>> {
        let (pool, task, actor) = (self.pool.clone(), id.clone(), actor.to_owned());
        self.ending(async move {
            let ended = in_transaction(&pool, |connection| {
                let (task, actor, events) = (task.clone(), actor.clone(), events.clone());
                Box::pin(async move {
                    tasks::revoke_task(connection, &task, now, &actor, &events).await
                })
            })
            .await?;
            let leases = ended.as_deref().map(ended_leases);
            Ok((leases, ended.unwrap_or_default()))
        })
        .await
    }

    async fn revoke_lease(
        &self,
        id: &LeaseId,
        now: UnixMillis,
        actor: &str,
        events: Vec<AuditEvent>,
    ) -> Result<Option<EndedLease>> {
        let (pool, lease, actor) = (self.pool.clone(), id.clone(), actor.to_owned());
        self.ending(async move {
            let ended = in_transaction(&pool, |connection| {
                let (lease, actor, events) = (lease.clone(), actor.clone(), events.clone());
                Box::pin(async move {
                    tasks::revoke_lease(connection, &lease, now, &actor, &events).await
                })
            })
            .await?;
            let ended: Vec<FeedEvent> = ended.into_iter().collect();
            Ok((ended_leases(&ended).pop(), ended))
        })
        .await
    }

    async fn expire_due(&self, now: UnixMillis, batch: usize) -> Result<ExpiryReport> {
        let pool = self.pool.clone();
        self.ending(async move {
            let (ended, tasks) = in_transaction(&pool, |connection| {
                Box::pin(tasks::expire_due(connection, now, batch, REAPER))
            })
            .await?;
            let report = ExpiryReport {
                leases: ended_leases(&ended),
                tasks,
            };
            Ok((report, ended))
        })
        .await
    }

    async fn is_lease_live(&self, lease: &LeaseId, task: &TaskId, now: UnixMillis) -> Result<bool> {
        if self.revocations.is_current() {
            Ok(!self.revocations.has_ended(lease, task))
        } else {
            tasks::lease_is_live(&self.pool, lease, now).await
        }
    }

    async fn count_lease_use(
        &self,
        lease: &LeaseId,
        max_uses: u32,
        now: UnixMillis,
    ) -> Result<Option<u32>> {
        let uses: Option<i32> = sqlx::query_scalar(
            "INSERT INTO lease_uses (lease_id, uses, last_used_at) VALUES ($1, 1, $3) \
             ON CONFLICT (lease_id) DO UPDATE SET uses = lease_uses.uses + 1, \
             last_used_at = excluded.last_used_at WHERE lease_uses.uses < $2 RETURNING uses",
        )
        .bind(lease.as_str())
        .bind(i64::from(max_uses))
        .bind(now.0)
        .fetch_optional(&self.pool)
        .await?;
        Ok(uses.and_then(|uses| u32::try_from(uses).ok()))
    }

    async fn feed_after(&self, cursor: u64, limit: usize) -> Result<FeedPage> {
        feed::after(&self.pool, cursor, limit).await
    }

    async fn feed_head(&self) -> Result<u64> {
        feed::head(&self.pool).await
    }

    async fn prune_feed(&self, horizon: UnixMillis, limit: usize) -> Result<u64> {
        feed::prune(&self.pool, horizon, limit).await
    }

    async fn record_events(&self, events: Vec<AuditEvent>) -> Result<()> {
        match self.committer.submit(Write::Events(events)).await? {
            Outcome::Stored => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn seal_audit_events(&self, limit: usize) -> Result<usize> {
        audit::seal(&self.pool, limit).await
    }

    async fn audit_head(&self) -> Result<(i64, String)> {
        audit::head(&self.pool).await
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        audit::checkpoints(&self.pool).await
    }

    async fn insert_checkpoint(&self, checkpoint: Checkpoint, now: UnixMillis) -> Result<()> {
        audit::insert_checkpoint(&self.pool, &checkpoint, now).await
    }

    async fn sealed_audit_events(&self, after_seq: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        audit::sealed_events(&self.pool, after_seq, limit).await
    }

    async fn unsealed_audit_events(&self) -> Result<i64> {
        audit::unsealed_count(&self.pool).await
    }

    async fn query_audit(&self, filter: AuditFilter) -> Result<Vec<AuditRecord>> {
        audit::query(&self.pool, &filter).await
    }

    async fn insert_grant_request(
        &self,
        request: GrantRequestRecord,
        max_pending: u32,
        now: UnixMillis,
        events: Vec<AuditEvent>,
        jobs: Vec<NewJob>,
    ) -> Result<GrantRequestInsertion> {
        self.write(Topic::Approvals, |connection| {
            let (request, events, jobs) = (request.clone(), events.clone(), jobs.clone());
            Box::pin(async move {
                grants::insert(connection, &request, max_pending, now, &events, &jobs).await
            })
        })
        .await
    }

    async fn find_grant_request(&self, id: &LeaseId) -> Result<Option<GrantRequestRecord>> {
        grants::find(&self.pool, id).await
    }

    async fn pending_grant_requests(
        &self,
        after: Option<&LeaseId>,
        filter: &PendingFilter,
        limit: usize,
        now: UnixMillis,
    ) -> Result<Vec<GrantRequestRecord>> {
        grants::pending(&self.pool, after, filter, limit, now).await
    }

    async fn expire_grant_requests(
        &self,
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<GrantRequestRecord>> {
        self.write(Topic::Approvals, |connection| {
            Box::pin(async move { grants::expire(connection, now, limit).await })
        })
        .await
    }

    async fn decide_grant_request(
        &self,
        decision: GrantDecision,
        now: UnixMillis,
    ) -> Result<GrantDecisionOutcome> {
        self.write(Topic::Approvals, |connection| {
            let decision = decision.clone();
            Box::pin(async move { grants::decide(connection, &decision, now).await })
        })
        .await
    }

    async fn insert_signing_key(
        &self,
        key: StoredSigningKey,
        events: Vec<AuditEvent>,
    ) -> Result<()> {
        self.write(Topic::Keys, |connection| {
            let (key, events) = (key.clone(), events.clone());
            Box::pin(async move { keys::insert(connection, &key, &events).await })
        })
        .await
    }

    async fn published_signing_keys(&self, now: UnixMillis) -> Result<Vec<StoredSigningKey>> {
        keys::published(&self.pool, now).await
    }

    async fn signing_public_key(&self, kid: &str) -> Result<Option<(KeyAlgorithm, Vec<u8>)>> {
        keys::public_key(&self.pool, kid).await
    }

    async fn latest_expiry_signed_by(&self, kid: &str) -> Result<Option<UnixMillis>> {
        keys::latest_expiry_signed_by(&self.pool, kid).await
    }

    async fn rotate_signing_key(
        &self,
        new: StoredSigningKey,
        promoted_kid: &str,
        retired_kid: &str,
        publish_until: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<()> {
        self.write(Topic::Keys, |connection| {
            let (new, promoted_kid, retired_kid, events) = (
                new.clone(),
                promoted_kid.to_owned(),
                retired_kid.to_owned(),
                events.clone(),
            );
            Box::pin(async move {
                keys::rotate(
                    connection,
                    &new,
                    &promoted_kid,
                    &retired_kid,
                    publish_until,
                    &events,
                )
                .await
            })
        })
        .await
    }

    async fn create_workload(
        &self,
        workload: WorkloadRecord,
        credential: Option<StoredCredential>,
        events: Vec<AuditEvent>,
    ) -> Result<()> {
        self.write(Topic::Workloads, |connection| {
            let (workload, credential, events) =
                (workload.clone(), credential.clone(), events.clone());
            Box::pin(async move {
                workloads::create(connection, &workload, credential.as_ref(), &events).await
            })
        })
        .await
    }

    async fn has_workloads(&self) -> Result<bool> {
        workloads::has_any(&self.pool).await
    }

    async fn find_credential(
        &self,
        credential_id: &str,
    ) -> Result<Option<(Vec<u8>, WorkloadRecord)>> {
        workloads::find_credential(&self.pool, credential_id).await
    }

    async fn list_workloads(&self) -> Result<Vec<WorkloadRecord>> {
        workloads::list(&self.pool).await
    }

    async fn find_workload(&self, name: &WorkloadName) -> Result<Option<WorkloadRecord>> {
        workloads::find(&self.pool, name).await
    }

    async fn replace_workload_credentials(
        &self,
        name: &WorkloadName,
        replacement: Option<StoredCredential>,
        now: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<Option<WorkloadRecord>> {
        self.write(Topic::Workloads, |connection| {
            let (name, replacement, events) = (name.clone(), replacement.clone(), events.clone());
            Box::pin(async move {
                workloads::replace_credentials(
                    connection,
                    &name,
                    replacement.as_ref(),
                    now,
                    &events,
                )
                .await
            })
        })
        .await
    }

    async fn revoke_identity(
        &self,
        name: &WorkloadName,
        end: IdentityEnd,
        now: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<Option<WorkloadRecord>> {
        self.write(Topic::Workloads, |connection| {
            let (name, events) = (name.clone(), events.clone());
            Box::pin(async move {
                workloads::revoke_identity(connection, &name, end, now, &events).await
            })
        })
        .await
    }

    async fn active_tasks_of(&self, workload_id: &str) -> Result<Vec<TaskId>> {
        workloads::active_tasks_of(&self.pool, workload_id).await
    }

    async fn insert_jwt_svid_key(&self, key: StoredJwtSvidKey) -> Result<StoredJwtSvidKey> {
        identity::insert_jwt_svid_key(&self.pool, &key).await
    }

    async fn insert_ca_key(&self, key: StoredCaKey) -> Result<Vec<StoredCaKey>> {
        identity::insert_ca_key(&self.pool, &key).await
    }

    async fn published_ca_keys(&self, now: UnixMillis) -> Result<Vec<StoredCaKey>> {
        identity::published_ca_keys(&self.pool, now).await
    }

    async fn rotate_ca(
        &self,
        new: StoredCaKey,
        retiring_id: &str,
        publish_until: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<()> {
        self.write(Topic::Keys, |connection| {
            let (new, retiring_id, events) = (new.clone(), retiring_id.to_owned(), events.clone());
            Box::pin(async move {
                identity::rotate_ca(connection, &new, &retiring_id, publish_until, &events).await
            })
        })
        .await
    }

    async fn latest_svid_expiry(&self) -> Result<Option<UnixMillis>> {
        identity::latest_svid_expiry(&self.pool).await
    }

    async fn insert_join_token(
        &self,
        token: JoinTokenRecord,
        events: Vec<AuditEvent>,
    ) -> Result<()> {
        in_transaction(&self.pool, |connection| {
            let (token, events) = (token.clone(), events.clone());
            Box::pin(async move { identity::insert_join_token(connection, &token, &events).await })
        })
        .await
    }

    async fn find_join_token(&self, id: &str) -> Result<Option<(JoinTokenRecord, WorkloadRecord)>> {
        identity::find_join_token(&self.pool, id).await
    }

    async fn consume_join_token(
        &self,
        id: &str,
        now: UnixMillis,
        svid: SvidRecord,
        events: Vec<AuditEvent>,
    ) -> Result<bool> {
        let write = Write::ConsumeJoinToken {
            id: id.to_owned(),
            now,
            svid,
            events,
        };
        match self.committer.submit(write).await? {
            Outcome::JoinTokenConsumed(consumed) => Ok(consumed),
            other => Err(unexpected(other)),
        }
    }

    async fn insert_svid(&self, svid: SvidRecord, events: Vec<AuditEvent>) -> Result<()> {
        match self
            .committer
            .submit(Write::InsertSvid { svid, events })
            .await?
        {
            Outcome::Stored => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn find_svid(&self, thumbprint: &str) -> Result<Option<(SvidRecord, WorkloadRecord)>> {
        identity::find_svid(&self.pool, thumbprint).await
    }

    async fn enqueue_jobs(&self, jobs: Vec<NewJob>, events: Vec<AuditEvent>) -> Result<()> {
        self.write(Topic::Jobs, |connection| {
            let (jobs, events) = (jobs.clone(), events.clone());
            Box::pin(async move { jobs::enqueue(connection, &jobs, &events).await })
        })
        .await
    }

    async fn claim_jobs(
        &self,
        kinds: &[String],
        limit: usize,
        lock_for: Duration,
        now: UnixMillis,
    ) -> Result<Vec<ClaimedJob>> {
        jobs::claim(&self.pool, kinds, limit, lock_for, now).await
    }

    async fn extend_job_claim(&self, job: &ClaimedJob, until: UnixMillis) -> Result<bool> {
        jobs::extend(&self.pool, job, until).await
    }

    async fn finish_job(&self, job: &ClaimedJob, outcome: JobOutcome) -> Result<bool> {
        jobs::finish(&self.pool, job, &outcome).await
    }

    async fn pending_jobs(&self, limit: usize) -> Result<Vec<JobRecord>> {
        jobs::pending(&self.pool, limit).await
    }
}
