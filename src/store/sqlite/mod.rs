//! The SQLite backend: one file, one broker, on rusqlite.
//!
//! - Writes go to the writer thread ([`writer`]), which applies each group-commit batch in one
//!   transaction and is the only connection that writes.
//! - Reads run on pooled read connections directly on the calling thread ([`readers`]); WAL
//!   mode lets them run beside the writer.
//! - The process holds an exclusive lock on `<database>.lock` while the store is open: the
//!   in-memory revocation state is exact only if this process makes every change, so a second
//!   broker on the same file (a careless rolling restart) is refused.

mod audit;
mod connection;
mod feed;
mod grants;
mod identity;
mod jobs;
mod keys;
mod readers;
mod schema;
mod tasks;
mod workloads;
mod writer;

use rusqlite::OptionalExtension;
use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use self::connection::{DatabaseFile, Role};
use self::readers::Readers;
use self::writer::{AfterCommit, Writer};
use super::records::{
    ApiKeyRecord, AuditFilter, AuditRecord, Checkpoint, CompletionOutcome, EndedLease,
    ExpiryReport, FeedPage, GrantDecision, GrantDecisionOutcome, GrantRequestInsertion,
    GrantRequestRecord, IdentityEnd, JoinTokenRecord, LeaseRecord, NewLeaseOutcome, PendingFilter,
    Renewal, RenewalOutcome, StoredCaKey, StoredJwtSvidKey, StoredSigningKey, SvidRecord,
    TaskInsertion, TaskRecord, WorkloadRecord,
};
use super::{
    Changes, ClaimedJob, JobOutcome, JobRecord, NewJob, RevocationState, Store, StoreError,
    StoreSettings,
};
use crate::audit::{AuditEvent, REAPER};
use crate::domain::{LeaseId, ScopeName, TaskId, UnixMillis, WorkloadName};
use crate::error::{Error, Result};
use crate::issuer::KeyAlgorithm;
use crate::issuer::credential::StoredCredential;

/// Read connections per store.
const READERS: usize = 4;

/// A broker's SQLite database.
pub struct SqliteStore {
    writer: Writer,
    readers: Arc<Readers>,
    revocations: Arc<RevocationState>,
    changes: Arc<Changes>,
    /// Held (locked) for as long as the store is open; released by `close`.
    lock: std::sync::Mutex<Option<File>>,
}

impl SqliteStore {
    /// Opens the database named by a `sqlite://PATH[?mode=rwc]` URL, applies migrations and
    /// loads the endings introspection must know.
    pub async fn open(url: &str, settings: StoreSettings) -> Result<Self, StoreError> {
        let file = DatabaseFile::from_url(url)?;
        tokio::task::spawn_blocking(move || Self::open_blocking(&file, settings))
            .await
            .map_err(|error| StoreError::Open(error.to_string()))?
    }

    fn open_blocking(file: &DatabaseFile, settings: StoreSettings) -> Result<Self, StoreError> {
        if !file.create && !file.path.is_file() {
            return Err(StoreError::Open(format!(
                "{}: no such database (add ?mode=rwc to the URL to create it)",
                file.path.display()
            )));
        }
        let lock = lock(file)?;
        let failed = |error: Error| StoreError::Open(error.to_string());
        let mut connection = connection::open(file, Role::Writer)?;
        schema::migrate(&mut connection)?;
        let sealed = audit::seal_leftovers(&mut connection).map_err(failed)?;
        if sealed > 0 {
            tracing::info!(
                events = sealed,
                "chained audit events left unsealed by an earlier version"
            );
        }
        let head = audit::read_head(&connection).map_err(failed)?;
        let revocations = Arc::new(RevocationState::own_writes_only());
        revocations.record(&feed::unexpired(&connection, UnixMillis::now()).map_err(failed)?);
        let changes = Arc::new(Changes::default());
        let readers = Arc::new(Readers::open(file, READERS)?);
        let after_commit = AfterCommit {
            revocations: revocations.clone(),
            changes: changes.clone(),
        };
        let writer = Writer::start(
            connection,
            head,
            after_commit,
            settings.write_queue,
            settings.write_timeout,
        )
        .map_err(|error| StoreError::Open(format!("cannot start the writer thread: {error}")))?;
        Ok(SqliteStore {
            writer,
            readers,
            revocations,
            changes,
            lock: std::sync::Mutex::new(Some(lock)),
        })
    }
}

/// A connection to the database at a `sqlite://` URL with the store's own settings (WAL,
/// `synchronous = FULL`), for tools beside the broker: the load generator's raw-commit
/// reference and its bulk preload.
pub fn tool_connection(url: &str) -> Result<rusqlite::Connection, StoreError> {
    connection::open(&DatabaseFile::from_url(url)?, Role::Writer)
}

/// Takes the exclusive lock on the database's lock file, or says who holds it.
fn lock(file: &DatabaseFile) -> Result<File, StoreError> {
    let path = file.lock_path();
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|error| StoreError::Open(format!("{}: {error}", path.display())))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(StoreError::InUse(file.path.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(error)) => {
            Err(StoreError::Open(format!("{}: {error}", path.display())))
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> bool {
        self.readers
            .read(|connection| Ok(connection.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
            .is_ok()
    }

    async fn close(&self) {
        self.writer.stop().await;
        self.readers.close();
        self.lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
    }

    fn changes(&self) -> &Changes {
        &self.changes
    }

    fn revocations(&self) -> &RevocationState {
        &self.revocations
    }

    async fn find_task(&self, id: &TaskId, workload_id: &str) -> Result<Option<TaskRecord>> {
        self.readers
            .read(|connection| tasks::find_task(connection, id, workload_id))
            .await
    }

    async fn find_task_by_idempotency_key(
        &self,
        workload_id: &str,
        key: &str,
    ) -> Result<Option<TaskRecord>> {
        self.readers
            .read(|connection| tasks::find_task_by_idempotency_key(connection, workload_id, key))
            .await
    }

    async fn leases_of_task(&self, id: &TaskId) -> Result<Vec<LeaseRecord>> {
        self.readers
            .read(|connection| tasks::leases_of_task(connection, id))
            .await
    }

    async fn set_api_key(
        &self,
        id: &LeaseId,
        secret_sha256: Vec<u8>,
        events: Vec<AuditEvent>,
    ) -> Result<bool> {
        let id = id.clone();
        self.writer
            .run(move |write| tasks::set_api_key(write, &id, &secret_sha256, &events))
            .await
    }

    async fn find_api_key(&self, id: &LeaseId) -> Result<Option<ApiKeyRecord>> {
        self.readers
            .read(|connection| tasks::find_api_key(connection, id))
            .await
    }

    async fn issued_leases_of_scope(
        &self,
        scope: &ScopeName,
        limit: usize,
    ) -> Result<Vec<LeaseId>> {
        self.readers
            .read(|connection| tasks::issued_leases_of_scope(connection, scope, limit))
            .await
    }

    async fn find_lease(&self, id: &LeaseId, workload_id: &str) -> Result<Option<LeaseRecord>> {
        self.readers
            .read(|connection| tasks::find_lease(connection, id, workload_id))
            .await
    }

    async fn insert_task(
        &self,
        task: TaskRecord,
        leases: Vec<LeaseRecord>,
        events: Vec<AuditEvent>,
    ) -> Result<TaskInsertion> {
        self.writer
            .run(move |write| tasks::insert_task(write, &task, &leases, &events))
            .await
    }

    async fn add_lease(
        &self,
        workload_id: &str,
        lease: LeaseRecord,
        now: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<NewLeaseOutcome> {
        let workload_id = workload_id.to_owned();
        self.writer
            .run(move |write| tasks::add_lease(write, &workload_id, &lease, now, &events))
            .await
    }

    async fn insert_grant_request(
        &self,
        request: GrantRequestRecord,
        max_pending: u32,
        now: UnixMillis,
        events: Vec<AuditEvent>,
        jobs: Vec<NewJob>,
    ) -> Result<GrantRequestInsertion> {
        self.writer
            .run(move |write| grants::insert(write, &request, max_pending, now, &events, &jobs))
            .await
    }

    async fn find_grant_request(&self, id: &LeaseId) -> Result<Option<GrantRequestRecord>> {
        self.readers
            .read(|connection| grants::find(connection, id))
            .await
    }

    async fn pending_grant_requests(
        &self,
        after: Option<&LeaseId>,
        filter: &PendingFilter,
        limit: usize,
        now: UnixMillis,
    ) -> Result<Vec<GrantRequestRecord>> {
        self.readers
            .read(|connection| grants::pending(connection, after, filter, limit, now))
            .await
    }

    async fn expire_grant_requests(
        &self,
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<GrantRequestRecord>> {
        self.writer
            .run(move |write| grants::expire(write, now, limit))
            .await
    }

    async fn decide_grant_request(
        &self,
        decision: GrantDecision,
        now: UnixMillis,
    ) -> Result<GrantDecisionOutcome> {
        self.writer
            .run(move |write| grants::decide(write, &decision, now))
            .await
    }

    async fn renew_lease(
        &self,
        renewal: Renewal,
        events: Vec<AuditEvent>,
    ) -> Result<RenewalOutcome> {
        self.writer
            .run(move |write| tasks::renew(write, &renewal, &events))
            .await
    }

    async fn complete_task(
        &self,
        id: &TaskId,
        workload_id: &str,
        now: UnixMillis,
        actor: &str,
    ) -> Result<CompletionOutcome> {
        let (task, workload, actor) = (id.clone(), workload_id.to_owned(), actor.to_owned());
        let completed = self
            .writer
            .run(move |write| tasks::complete(write, &task, &workload, now, &actor))
            .await?;
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
        let (task, actor) = (id.clone(), actor.to_owned());
        self.writer
            .run(move |write| tasks::revoke_task(write, &task, now, &actor, &events))
            .await
    }

    async fn revoke_lease(
        &self,
        id: &LeaseId,
        now: UnixMillis,
        actor: &str,
        events: Vec<AuditEvent>,
    ) -> Result<Option<EndedLease>> {
        let (lease, actor) = (id.clone(), actor.to_owned());
        self.writer
            .run(move |write| tasks::revoke_lease(write, &lease, now, &actor, &events))
            .await
    }

    async fn expire_due(&self, now: UnixMillis, batch: usize) -> Result<ExpiryReport> {
        self.writer
            .run(move |write| tasks::expire_due(write, now, batch, REAPER))
            .await
    }

    async fn is_lease_live(
        &self,
        lease: &LeaseId,
        task: &TaskId,
        _now: UnixMillis,
    ) -> Result<bool> {
        // This process makes every change to the file (the lock file sees to that), so the
        // revocation state is always current.
        Ok(!self.revocations.has_ended(lease, task))
    }

    async fn count_lease_use(
        &self,
        lease: &LeaseId,
        max_uses: u32,
        now: UnixMillis,
    ) -> Result<Option<u32>> {
        let lease = lease.clone();
        self.writer
            .run(move |write| {
                let uses = write
                    .connection
                    .prepare_cached(
                        "INSERT INTO lease_uses (lease_id, uses, last_used_at) VALUES (?1, 1, ?3) \
                         ON CONFLICT (lease_id) DO UPDATE SET uses = uses + 1, \
                         last_used_at = excluded.last_used_at WHERE lease_uses.uses < ?2 \
                         RETURNING uses",
                    )?
                    .query_row(rusqlite::params![lease.as_str(), max_uses, now.0], |row| {
                        row.get(0)
                    })
                    .optional()?;
                Ok(uses)
            })
            .await
    }

    async fn feed_after(&self, cursor: u64, limit: usize) -> Result<FeedPage> {
        self.readers
            .read_long(move |connection| feed::after(connection, cursor, limit))
            .await
    }

    async fn feed_head(&self) -> Result<u64> {
        self.readers.read(feed::head).await
    }

    async fn prune_feed(&self, horizon: UnixMillis, limit: usize) -> Result<u64> {
        self.writer
            .run(move |write| feed::prune(write, horizon, limit))
            .await
    }

    async fn record_events(&self, events: Vec<AuditEvent>) -> Result<()> {
        self.writer
            .run(move |write| audit::insert_events(write, &events))
            .await
    }

    async fn seal_audit_events(&self, _limit: usize) -> Result<usize> {
        Ok(0)
    }

    async fn audit_head(&self) -> Result<(i64, String)> {
        let head = self.readers.read(audit::read_head).await?;
        Ok((head.seq, head.hash))
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        self.readers.read_long(audit::checkpoints).await
    }

    async fn insert_checkpoint(&self, checkpoint: Checkpoint, now: UnixMillis) -> Result<()> {
        self.writer
            .run(move |write| audit::insert_checkpoint(write, &checkpoint, now))
            .await
    }

    async fn sealed_audit_events(&self, after_seq: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        self.readers
            .read_long(move |connection| audit::sealed_events(connection, after_seq, limit))
            .await
    }

    async fn unsealed_audit_events(&self) -> Result<i64> {
        self.readers.read(audit::unsealed_count).await
    }

    async fn query_audit(&self, filter: AuditFilter) -> Result<Vec<AuditRecord>> {
        self.readers
            .read_long(move |connection| audit::query(connection, &filter))
            .await
    }

    async fn insert_signing_key(
        &self,
        key: StoredSigningKey,
        events: Vec<AuditEvent>,
    ) -> Result<()> {
        self.writer
            .run(move |write| keys::insert(write, &key, &events))
            .await
    }

    async fn published_signing_keys(&self, now: UnixMillis) -> Result<Vec<StoredSigningKey>> {
        self.readers
            .read(|connection| keys::published(connection, now))
            .await
    }

    async fn signing_public_key(&self, kid: &str) -> Result<Option<(KeyAlgorithm, Vec<u8>)>> {
        self.readers
            .read(|connection| keys::public_key(connection, kid))
            .await
    }

    async fn latest_expiry_signed_by(&self, kid: &str) -> Result<Option<UnixMillis>> {
        let kid = kid.to_owned();
        self.readers
            .read_long(move |connection| keys::latest_expiry_signed_by(connection, &kid))
            .await
    }

    async fn rotate_signing_key(
        &self,
        new: StoredSigningKey,
        promoted_kid: &str,
        retired_kid: &str,
        publish_until: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<()> {
        let (promoted_kid, retired_kid) = (promoted_kid.to_owned(), retired_kid.to_owned());
        self.writer
            .run(move |write| {
                keys::rotate(
                    write,
                    &new,
                    &promoted_kid,
                    &retired_kid,
                    publish_until,
                    &events,
                )
            })
            .await
    }

    async fn create_workload(
        &self,
        workload: WorkloadRecord,
        credential: Option<StoredCredential>,
        events: Vec<AuditEvent>,
    ) -> Result<()> {
        self.writer
            .run(move |write| workloads::create(write, &workload, credential.as_ref(), &events))
            .await
    }

    async fn has_workloads(&self) -> Result<bool> {
        self.readers.read(workloads::has_any).await
    }

    async fn find_credential(
        &self,
        credential_id: &str,
    ) -> Result<Option<(Vec<u8>, WorkloadRecord)>> {
        self.readers
            .read(|connection| workloads::find_credential(connection, credential_id))
            .await
    }

    async fn list_workloads(&self) -> Result<Vec<WorkloadRecord>> {
        self.readers.read_long(workloads::list).await
    }

    async fn find_workload(&self, name: &WorkloadName) -> Result<Option<WorkloadRecord>> {
        self.readers
            .read(|connection| workloads::find(connection, name))
            .await
    }

    async fn replace_workload_credentials(
        &self,
        name: &WorkloadName,
        replacement: Option<StoredCredential>,
        now: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<Option<WorkloadRecord>> {
        let name = name.clone();
        self.writer
            .run(move |write| {
                workloads::replace_credentials(write, &name, replacement.as_ref(), now, &events)
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
        let name = name.clone();
        self.writer
            .run(move |write| workloads::revoke_identity(write, &name, end, now, &events))
            .await
    }

    async fn active_tasks_of(&self, workload_id: &str) -> Result<Vec<TaskId>> {
        self.readers
            .read(|connection| workloads::active_tasks_of(connection, workload_id))
            .await
    }

    async fn insert_jwt_svid_key(&self, key: StoredJwtSvidKey) -> Result<StoredJwtSvidKey> {
        self.writer
            .run(move |write| identity::insert_jwt_svid_key(write, &key))
            .await
    }

    async fn insert_ca_key(&self, key: StoredCaKey) -> Result<Vec<StoredCaKey>> {
        self.writer
            .run(move |write| {
                identity::insert_ca_key(write, &key)?;
                identity::published_ca_keys(write.connection, key.created_at)
            })
            .await
    }

    async fn published_ca_keys(&self, now: UnixMillis) -> Result<Vec<StoredCaKey>> {
        self.readers
            .read(move |connection| identity::published_ca_keys(connection, now))
            .await
    }

    async fn rotate_ca(
        &self,
        new: StoredCaKey,
        retiring_id: &str,
        publish_until: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<()> {
        let retiring_id = retiring_id.to_owned();
        self.writer
            .run(move |write| {
                identity::rotate_ca(write, &new, &retiring_id, publish_until, &events)
            })
            .await
    }

    async fn latest_svid_expiry(&self) -> Result<Option<UnixMillis>> {
        self.readers.read(identity::latest_svid_expiry).await
    }

    async fn insert_join_token(
        &self,
        token: JoinTokenRecord,
        events: Vec<AuditEvent>,
    ) -> Result<()> {
        self.writer
            .run(move |write| identity::insert_join_token(write, &token, &events))
            .await
    }

    async fn find_join_token(&self, id: &str) -> Result<Option<(JoinTokenRecord, WorkloadRecord)>> {
        self.readers
            .read(|connection| identity::find_join_token(connection, id))
            .await
    }

    async fn consume_join_token(
        &self,
        id: &str,
        now: UnixMillis,
        svid: SvidRecord,
        events: Vec<AuditEvent>,
    ) -> Result<bool> {
        let id = id.to_owned();
        self.writer
            .run(move |write| identity::consume_join_token(write, &id, now, &svid, &events))
            .await
    }

    async fn insert_svid(&self, svid: SvidRecord, events: Vec<AuditEvent>) -> Result<()> {
        self.writer
            .run(move |write| identity::insert_svid(write, &svid, &events))
            .await
    }

    async fn find_svid(&self, thumbprint: &str) -> Result<Option<(SvidRecord, WorkloadRecord)>> {
        self.readers
            .read(|connection| identity::find_svid(connection, thumbprint))
            .await
    }

    async fn enqueue_jobs(&self, jobs: Vec<NewJob>, events: Vec<AuditEvent>) -> Result<()> {
        self.writer
            .run(move |write| jobs::enqueue(write, &jobs, &events))
            .await
    }

    async fn claim_jobs(
        &self,
        kinds: &[String],
        limit: usize,
        lock_for: Duration,
        now: UnixMillis,
    ) -> Result<Vec<ClaimedJob>> {
        let kinds = kinds.to_vec();
        self.writer
            .run(move |write| jobs::claim(write, &kinds, limit, lock_for, now))
            .await
    }

    async fn extend_job_claim(&self, job: &ClaimedJob, until: UnixMillis) -> Result<bool> {
        let job = job.clone();
        self.writer
            .run(move |write| jobs::extend(write, &job, until))
            .await
    }

    async fn finish_job(&self, job: &ClaimedJob, outcome: JobOutcome) -> Result<bool> {
        let job = job.clone();
        self.writer
            .run(move |write| jobs::finish(write, &job, &outcome))
            .await
    }

    async fn pending_jobs(&self, limit: usize) -> Result<Vec<JobRecord>> {
        self.readers
            .read_long(move |connection| jobs::pending(connection, limit))
            .await
    }
}
