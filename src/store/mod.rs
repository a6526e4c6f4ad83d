//! Persistence: one contract, [`Store`], at the level of the broker's operations, and one
//! implementation per database, each with its own SQL and migrations.
//!
//! - [`sqlite`]: the embedded default, one file, on rusqlite. One writer thread owns the write
//!   connection and applies a whole group-commit batch synchronously; reads run on pooled
//!   connections directly on the calling thread.
//! - [`postgres`]: several replicas sharing one database, on sqlx's typed `PgPool`. Batches are
//!   written with array binds, no global lock row sits on the issuance or revocation path, and
//!   replicas wake each other with `LISTEN/NOTIFY`.
//!
//! The contract is a trait object (`Arc<dyn Store>`) rather than an enum or a generic parameter:
//! the broker, the gRPC layer and the background tasks are written once against it, without a
//! type parameter threading through every module, and the conformance suite
//! (`tests/it/conformance.rs`) runs the same tests on each implementation. The cost, one boxed future per operation, is far below
//! the cost of the operation itself.
//!
//! Guarantees every implementation gives (and the conformance suite checks):
//! - A write returns only after its transaction has committed durably (SQLite WAL with
//!   `synchronous=FULL`; PostgreSQL's default `synchronous_commit=on`), so a credential handed
//!   out after a write always has its lease stored.
//! - Every change that ends leases appends its revocation-feed events and its audit events in
//!   the same transaction, and records the endings in this process's [`RevocationState`] before
//!   the write returns.
//! - The feed never skips an event: a subscriber that resumes after a cursor receives every
//!   event committed after it, however late its transaction committed.
//! - Writes wait in a bounded queue: when it is full the caller is refused at once
//!   (`RESOURCE_EXHAUSTED`), and a write the database does not commit in time fails with
//!   `UNAVAILABLE`, instead of memory growing during a database stall.

pub mod changes;
pub mod events;
pub mod jobs;
pub mod postgres;
pub mod records;
pub mod revocations;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::audit::AuditEvent;
use crate::domain::{LeaseId, ScopeName, TaskId, UnixMillis, WorkloadName};
use crate::error::Result;
use crate::issuer::KeyAlgorithm;
use crate::issuer::credential::StoredCredential;

pub use changes::{Changes, Topic};
pub use jobs::{ClaimedJob, JobOutcome, JobRecord, NewJob};
pub use records::{
    ApiKeyRecord, ApprovalRecord, AuditFilter, AuditRecord, Checkpoint, CompletionOutcome,
    EndedLease, ExpiryReport, FeedEvent, FeedPage, FeedRecord, GrantDecision, GrantDecisionOutcome,
    GrantRequestInsertion, GrantRequestRecord, IdentityEnd, JoinTokenRecord, LeaseRecord,
    NewLeaseOutcome, PendingFilter, Renewal, RenewalOutcome, StoredCaKey, StoredJwtSvidKey,
    StoredSigningKey, SvidRecord, TaskInsertion, TaskRecord, WorkloadRecord,
};
pub use revocations::RevocationState;

/// A store shared by everything in the broker.
pub type SharedStore = Arc<dyn Store>;

/// How the store paces writes.
#[derive(Clone, Copy, Debug)]
pub struct StoreSettings {
    /// Writes waiting for their batch at most; more are refused with `RESOURCE_EXHAUSTED`.
    pub write_queue: usize,
    /// How long a write may wait for its commit before it fails with `UNAVAILABLE`.
    pub write_timeout: Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            write_queue: 8192,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// A store that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database_url: unsupported scheme (expected sqlite:// or postgres://)")]
    UnsupportedUrl,
    #[error("cannot open the database: {0}")]
    Open(String),
    #[error("cannot apply database migrations: {0}")]
    Migrate(String),
    #[error(
        "the SQLite database {0} is already open in another broker: one SQLite file serves one \
         broker (use PostgreSQL for several replicas)"
    )]
    InUse(String),
}

/// Opens the database at `url` (creating a SQLite file if the URL says `mode=rwc`) and applies
/// its migrations.
pub async fn open(url: &str, settings: StoreSettings) -> Result<SharedStore, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::open(url, settings).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(
            postgres::PostgresStore::open(url, settings).await?,
        ))
    } else {
        Err(StoreError::UnsupportedUrl)
    }
}

/// Everything the broker persists, as operations of the broker's own domain.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Whether the database answers; `/readyz` reports this.
    async fn ping(&self) -> bool;

    /// Lets queued writes commit, stops background work and closes every connection.
    async fn close(&self);

    /// Notifications of committed changes, this replica's and (on PostgreSQL) the others'.
    fn changes(&self) -> &Changes;

    /// The ended leases and tasks introspection consults (see [`RevocationState`]).
    fn revocations(&self) -> &RevocationState;

    // --- tasks and leases ---

    /// The task `id` if `workload_id` owns it.
    async fn find_task(&self, id: &TaskId, workload_id: &str) -> Result<Option<TaskRecord>>;

    /// The task `workload_id` opened with idempotency key `key`, if any.
    async fn find_task_by_idempotency_key(
        &self,
        workload_id: &str,
        key: &str,
    ) -> Result<Option<TaskRecord>>;

    /// Every lease of a task, oldest first.
    async fn leases_of_task(&self, id: &TaskId) -> Result<Vec<LeaseRecord>>;

    /// The lease `id` if it belongs to a task of `workload_id`.
    async fn find_lease(&self, id: &LeaseId, workload_id: &str) -> Result<Option<LeaseRecord>>;

    /// Stores a new task with its first leases and `events`, unless the workload already used
    /// the task's idempotency key or its identity is revoked (then nothing is stored). The
    /// identity check is atomic with the insert, so a task either commits before the kill
    /// switch (which then revokes it) or not at all.
    async fn insert_task(
        &self,
        task: TaskRecord,
        leases: Vec<LeaseRecord>,
        events: Vec<AuditEvent>,
    ) -> Result<TaskInsertion>;

    /// Adds `lease` to its task if `workload_id` owns the task and it is active at `now`.
    async fn add_lease(
        &self,
        workload_id: &str,
        lease: LeaseRecord,
        now: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<NewLeaseOutcome>;

    /// Moves an issued, unexpired lease of an active task to its renewed window.
    async fn renew_lease(
        &self,
        renewal: Renewal,
        events: Vec<AuditEvent>,
    ) -> Result<RenewalOutcome>;

    /// Completes an active task of `workload_id` and revokes every issued lease it holds;
    /// `actor` is recorded as the cause.
    async fn complete_task(
        &self,
        id: &TaskId,
        workload_id: &str,
        now: UnixMillis,
        actor: &str,
    ) -> Result<CompletionOutcome>;

    /// Revokes an active task (any workload's) and its leases; `None` when no such active task.
    async fn revoke_task(
        &self,
        id: &TaskId,
        now: UnixMillis,
        actor: &str,
        events: Vec<AuditEvent>,
    ) -> Result<Option<Vec<EndedLease>>>;

    /// Records the hash of lease `id`'s API key, with `events`, unless the lease already has
    /// one or is no longer issued: a key is handed out once. Whether it was recorded.
    async fn set_api_key(
        &self,
        id: &LeaseId,
        secret_sha256: Vec<u8>,
        events: Vec<AuditEvent>,
    ) -> Result<bool>;

    /// The lease whose API key was handed out, in whatever state, with its key's hash and holder.
    async fn find_api_key(&self, id: &LeaseId) -> Result<Option<ApiKeyRecord>>;

    /// Up to `limit` issued leases (any workload's) of `scope`, oldest first.
    async fn issued_leases_of_scope(&self, scope: &ScopeName, limit: usize)
    -> Result<Vec<LeaseId>>;

    /// Revokes one issued lease (any workload's); `None` when no such issued lease.
    async fn revoke_lease(
        &self,
        id: &LeaseId,
        now: UnixMillis,
        actor: &str,
        events: Vec<AuditEvent>,
    ) -> Result<Option<EndedLease>>;

    /// Marks up to `batch` leases and `batch` tasks whose time has passed at `now` as expired,
    /// each re-checked under its lock, so a renewal that committed first is never expired.
    async fn expire_due(&self, now: UnixMillis, batch: usize) -> Result<ExpiryReport>;

    /// Whether the lease of a well-signed, unexpired token is still issued and its task active:
    /// the broker's half of introspection. Answered from [`RevocationState`] while it is
    /// current, from the database otherwise.
    async fn is_lease_live(&self, lease: &LeaseId, task: &TaskId, now: UnixMillis) -> Result<bool>;

    /// Counts one use of `lease` at `now` unless it has been used `max_uses` times: the uses
    /// counted so far including this one, or `None` when none was left.
    async fn count_lease_use(
        &self,
        lease: &LeaseId,
        max_uses: u32,
        now: UnixMillis,
    ) -> Result<Option<u32>>;

    // Grant requests waiting for approval.

    /// Stores a grant request with `events` and `jobs` (its notifications) if its workload's
    /// task is active at `now` and the workload has fewer than `max_pending` requests waiting.
    async fn insert_grant_request(
        &self,
        request: GrantRequestRecord,
        max_pending: u32,
        now: UnixMillis,
        events: Vec<AuditEvent>,
        jobs: Vec<NewJob>,
    ) -> Result<GrantRequestInsertion>;

    /// The grant request `id` with its approvals.
    async fn find_grant_request(&self, id: &LeaseId) -> Result<Option<GrantRequestRecord>>;

    /// Up to `limit` requests pending and still within their wait at `now`, after `after`
    /// (ids sort by age), oldest first, that `filter` matches.
    async fn pending_grant_requests(
        &self,
        after: Option<&LeaseId>,
        filter: &PendingFilter,
        limit: usize,
        now: UnixMillis,
    ) -> Result<Vec<GrantRequestRecord>>;

    /// Marks up to `limit` pending requests whose wait ended before `now` as expired, and
    /// returns them.
    async fn expire_grant_requests(
        &self,
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<GrantRequestRecord>>;

    /// Records an operator's answer under the request's lock, so that concurrent answers (on
    /// any replica) issue exactly one lease: a pending, unexpired request of an active task
    /// takes the answer once per operator; a denial ends it; the approval that reaches the
    /// quorum inserts `decision.lease`.
    async fn decide_grant_request(
        &self,
        decision: GrantDecision,
        now: UnixMillis,
    ) -> Result<GrantDecisionOutcome>;

    // --- the revocation feed ---

    /// Up to `limit` events after `cursor`, in feed order.
    async fn feed_after(&self, cursor: u64, limit: usize) -> Result<FeedPage>;

    /// The cursor of the latest event a reader can see now (0 for an empty feed).
    async fn feed_head(&self) -> Result<u64>;

    /// Deletes up to `limit` feed events whose tokens all expired before `horizon`, returning
    /// how many it deleted. What remains is every revocation still in force, so a subscriber
    /// starting from 0 (or from any cursor older than what is kept) receives exactly that
    /// snapshot and then follows live, without replaying all history.
    async fn prune_feed(&self, horizon: UnixMillis, limit: usize) -> Result<u64>;

    // --- the audit trail ---

    /// Writes events that record no other change (refusals, use checks) in a shared batch.
    async fn record_events(&self, events: Vec<AuditEvent>) -> Result<()>;

    /// Chains up to `limit` committed, unsealed events; returns how many. On SQLite events are
    /// chained as they are written, so there is never anything to seal.
    async fn seal_audit_events(&self, limit: usize) -> Result<usize>;

    /// The last sealed position and its hash.
    async fn audit_head(&self) -> Result<(i64, String)>;

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>>;

    /// Stores a checkpoint; one another replica made of the same position is kept.
    async fn insert_checkpoint(&self, checkpoint: Checkpoint, now: UnixMillis) -> Result<()>;

    /// Up to `limit` sealed events after `after_seq`, in chain order.
    async fn sealed_audit_events(&self, after_seq: i64, limit: usize) -> Result<Vec<AuditRecord>>;

    /// How many committed events await sealing.
    async fn unsealed_audit_events(&self) -> Result<i64>;

    /// Events matching `filter`, in the order they happened (sealed or not).
    async fn query_audit(&self, filter: AuditFilter) -> Result<Vec<AuditRecord>>;

    // --- signing keys ---

    /// Stores a new signing key with `events`.
    async fn insert_signing_key(
        &self,
        key: StoredSigningKey,
        events: Vec<AuditEvent>,
    ) -> Result<()>;

    /// Keys that belong in the JWKS at `now`: the current key, the next key, and retired keys
    /// whose publication window is still open, newest first.
    async fn published_signing_keys(&self, now: UnixMillis) -> Result<Vec<StoredSigningKey>>;

    /// The algorithm and public key of `kid`, current, retired or expired.
    async fn signing_public_key(&self, kid: &str) -> Result<Option<(KeyAlgorithm, Vec<u8>)>>;

    /// The latest expiry of any lease whose current token `kid` signed.
    async fn latest_expiry_signed_by(&self, kid: &str) -> Result<Option<UnixMillis>>;

    /// Retires `retired_kid` (published until `publish_until`), makes `promoted_kid` (the next
    /// key) current and stores `new` as the next key, atomically; fails if `retired_kid` is no
    /// longer current or `promoted_kid` no longer next (a concurrent rotation).
    async fn rotate_signing_key(
        &self,
        new: StoredSigningKey,
        promoted_kid: &str,
        retired_kid: &str,
        publish_until: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<()>;

    // --- workloads ---

    /// Stores a workload with its first credential (if any) and `events`.
    async fn create_workload(
        &self,
        workload: WorkloadRecord,
        credential: Option<StoredCredential>,
        events: Vec<AuditEvent>,
    ) -> Result<()>;

    /// Whether any workload is registered (a fresh store has none).
    async fn has_workloads(&self) -> Result<bool>;

    /// The workload holding the unrevoked credential `credential_id`, with the credential's
    /// secret hash for the caller to compare.
    async fn find_credential(
        &self,
        credential_id: &str,
    ) -> Result<Option<(Vec<u8>, WorkloadRecord)>>;

    async fn list_workloads(&self) -> Result<Vec<WorkloadRecord>>;

    /// The workload named `name`, unless its entry was deleted.
    async fn find_workload(&self, name: &WorkloadName) -> Result<Option<WorkloadRecord>>;

    /// Revokes every bearer credential of the workload named `name` at `now` and stores
    /// `replacement` (if any) as its only valid one, with `events`, in one transaction: a
    /// rotation. With `None`, a revocation of every way it authenticates: its SVIDs and unused
    /// join tokens too. `None` when no such workload exists (nothing is written).
    async fn replace_workload_credentials(
        &self,
        name: &WorkloadName,
        replacement: Option<StoredCredential>,
        now: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<Option<WorkloadRecord>>;

    /// The kill switch's store half: everything [`Store::replace_workload_credentials`] with
    /// `None` revokes, and the workload itself is marked revoked at `now`, so that nothing
    /// authenticates or attests as it again (a matching process or a new join token included).
    /// With [`IdentityEnd::Deleted`] the entry is deleted too. `None` for an unknown or deleted
    /// entry.
    async fn revoke_identity(
        &self,
        name: &WorkloadName,
        end: IdentityEnd,
        now: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<Option<WorkloadRecord>>;

    /// The ids of the workload's active tasks.
    async fn active_tasks_of(&self, workload_id: &str) -> Result<Vec<TaskId>>;

    // --- workload identity ---

    /// Stores `key` unless a CA key with its id exists; then the CAs in the trust bundle as of
    /// its creation, oldest activation first. Two replicas starting together on a fresh store
    /// both get the one stored first.
    async fn insert_ca_key(&self, key: StoredCaKey) -> Result<Vec<StoredCaKey>>;

    /// The CAs in the trust bundle at `now` (not retired, or retired with `publish_until` still
    /// ahead), oldest activation first.
    async fn published_ca_keys(&self, now: UnixMillis) -> Result<Vec<StoredCaKey>>;

    /// Retires the CA `retiring_id` (kept in the bundle until `publish_until`) and stores `new`
    /// with `events`, atomically, notifying [`Topic::Keys`]; `FailedPrecondition` if
    /// `retiring_id` is already retired (a concurrent rotation).
    async fn rotate_ca(
        &self,
        new: StoredCaKey,
        retiring_id: &str,
        publish_until: UnixMillis,
        events: Vec<AuditEvent>,
    ) -> Result<()>;

    /// The latest expiry of any X.509-SVID issued, so a retired CA stays trusted as long as
    /// an SVID it may have signed.
    async fn latest_svid_expiry(&self) -> Result<Option<UnixMillis>>;

    /// Stores `key` unless a JWT-SVID key with its id exists; returns the key stored under that
    /// id, so replicas starting together all sign with the one stored first.
    async fn insert_jwt_svid_key(&self, key: StoredJwtSvidKey) -> Result<StoredJwtSvidKey>;

    /// Stores a join token with `events`.
    async fn insert_join_token(
        &self,
        token: JoinTokenRecord,
        events: Vec<AuditEvent>,
    ) -> Result<()>;

    /// The join token `id` and its workload, used or not.
    async fn find_join_token(&self, id: &str) -> Result<Option<(JoinTokenRecord, WorkloadRecord)>>;

    /// Marks the join token `id` used at `now` and stores `svid` with `events`, in one
    /// transaction, if the token is still unused, unrevoked and unexpired; false (nothing
    /// written) otherwise, so a token is used at most once across replicas.
    async fn consume_join_token(
        &self,
        id: &str,
        now: UnixMillis,
        svid: SvidRecord,
        events: Vec<AuditEvent>,
    ) -> Result<bool>;

    /// Stores an SVID handed out by renewal, with `events`.
    async fn insert_svid(&self, svid: SvidRecord, events: Vec<AuditEvent>) -> Result<()>;

    /// The unrevoked SVID with `thumbprint` and its workload.
    async fn find_svid(&self, thumbprint: &str) -> Result<Option<(SvidRecord, WorkloadRecord)>>;

    // --- the job queue ---

    /// Stores `jobs` with `events`, in one transaction.
    async fn enqueue_jobs(&self, jobs: Vec<NewJob>, events: Vec<AuditEvent>) -> Result<()>;

    /// Claims up to `limit` due jobs of `kinds` for `lock_for`: no other runner takes them
    /// while the claim holds. Jobs whose claim lapsed (their runner died) are due again.
    async fn claim_jobs(
        &self,
        kinds: &[String],
        limit: usize,
        lock_for: Duration,
        now: UnixMillis,
    ) -> Result<Vec<ClaimedJob>>;

    /// Extends a claim; `false` when it has lapsed and another runner may hold the job.
    async fn extend_job_claim(&self, job: &ClaimedJob, until: UnixMillis) -> Result<bool>;

    /// Records how an attempt ended; `false` when the claim had lapsed (nothing changed).
    async fn finish_job(&self, job: &ClaimedJob, outcome: JobOutcome) -> Result<bool>;

    /// Jobs not done yet, oldest first (at most `limit`).
    async fn pending_jobs(&self, limit: usize) -> Result<Vec<JobRecord>>;
}
