//! What the store keeps and returns, as plain values: the same for every backend. Each backend
//! decodes its own rows into these.

use crate::audit::AuditEvent;
use crate::audit::chain::SealedEvent;
use crate::domain::task::{GrantRequestState, LeaseWindow, Verdict};
use crate::domain::{
    Caller, CredentialKind, Labels, LeaseId, LeaseState, RevocationReason, Role, ScopeName,
    SpiffeId, TaskContext, TaskId, TaskState, UnixMillis, WorkloadName,
};
use crate::error::Error;
use crate::issuer::KeyAlgorithm;

/// A registered workload.
#[derive(Clone, Debug)]
pub struct WorkloadRecord {
    pub id: String,
    pub name: WorkloadName,
    pub spiffe_id: SpiffeId,
    pub roles: Vec<Role>,
    /// The audiences a `resource_server` serves; empty for other workloads.
    pub audiences: Vec<String>,
    /// What it must prove to the `unix` attestor, sorted; empty to attest with join tokens only.
    pub selectors: Vec<String>,
    pub created_at: UnixMillis,
    /// When the kill switch ended its identity; nothing authenticates or attests as it after.
    pub revoked_at: Option<UnixMillis>,
    /// What policy reads of it.
    pub labels: Labels,
    /// When its entry was deleted (its identity revoked, its selectors released); a deleted
    /// entry is not listed and takes no admin operation.
    pub deleted_at: Option<UnixMillis>,
}

impl WorkloadRecord {
    /// The workload as the caller of a request (or the holder of a token), authenticated by
    /// the X.509-SVID of `certificate_thumbprint` or, with `None`, a bearer credential.
    pub fn into_caller(self, certificate_thumbprint: Option<String>) -> Caller {
        Caller {
            workload_id: self.id,
            name: self.name,
            spiffe_id: self.spiffe_id,
            roles: self.roles,
            audiences: self.audiences,
            certificate_thumbprint,
            labels: self.labels,
        }
    }
}

/// How the kill switch ends an identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityEnd {
    /// The identity is revoked; the entry stays listed, revoked.
    Revoked,
    /// The entry is deleted as well: unlisted, its selectors free for another entry.
    Deleted,
}

/// An X.509 CA as stored: its certificate in clear, its private key sealed under the master
/// key.
#[derive(Clone, Debug)]
pub struct StoredCaKey {
    pub id: String,
    /// DER.
    pub certificate: Vec<u8>,
    pub sealed_private_key: Vec<u8>,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    /// When it starts signing: the newest CA activated by now is the one that signs.
    pub activated_at: UnixMillis,
    /// Set when a rotation retires it: it stays in the trust bundle until then.
    pub publish_until: Option<UnixMillis>,
}

/// The JWT-SVID signing key as stored: ES256 PKCS#8, sealed under the master key.
#[derive(Clone, Debug)]
pub struct StoredJwtSvidKey {
    pub id: String,
    pub sealed_private_key: Vec<u8>,
    pub created_at: UnixMillis,
}

/// A one-time join token as stored: only the hash of its secret.
#[derive(Clone, Debug)]
pub struct JoinTokenRecord {
    pub id: String,
    pub workload_id: String,
    pub secret_sha256: Vec<u8>,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    /// When it was used; a used token is refused.
    pub consumed_at: Option<UnixMillis>,
}

/// An X.509-SVID handed out, known by its thumbprint (base64url SHA-256 of its DER).
#[derive(Clone, Debug)]
pub struct SvidRecord {
    pub thumbprint: String,
    pub workload_id: String,
    /// The certificate's serial number, hex.
    pub serial: String,
    pub issued_at: UnixMillis,
    pub expires_at: UnixMillis,
}

/// A signing key as stored: public half in clear, private half sealed under the master key.
#[derive(Clone, Debug)]
pub struct StoredSigningKey {
    pub kid: String,
    pub algorithm: KeyAlgorithm,
    pub public_key: Vec<u8>,
    pub sealed_private_key: Vec<u8>,
    pub created_at: UnixMillis,
    /// When it started signing; `None` for the next key (published, not yet signing).
    pub activated_at: Option<UnixMillis>,
    pub retired_at: Option<UnixMillis>,
    pub publish_until: Option<UnixMillis>,
}

impl StoredSigningKey {
    /// The key that signs: activated and not retired.
    pub fn is_current(&self) -> bool {
        self.activated_at.is_some() && self.retired_at.is_none()
    }

    /// The key published ahead of the next rotation: never activated.
    pub fn is_next(&self) -> bool {
        self.activated_at.is_none() && self.retired_at.is_none()
    }
}

/// A task.
#[derive(Clone, Debug)]
pub struct TaskRecord {
    pub id: TaskId,
    pub workload_id: String,
    pub purpose: String,
    pub context: TaskContext,
    pub state: TaskState,
    pub created_at: UnixMillis,
    pub deadline: UnixMillis,
    pub ended_at: Option<UnixMillis>,
    pub idempotency_key: Option<String>,
    pub request_digest: Option<String>,
}

/// A lease of a task.
#[derive(Clone, Debug)]
pub struct LeaseRecord {
    pub id: LeaseId,
    pub task_id: TaskId,
    pub scope: ScopeName,
    pub kind: CredentialKind,
    pub audience: String,
    pub state: LeaseState,
    pub kid: Option<String>,
    pub window: LeaseWindow,
    pub ended_at: Option<UnixMillis>,
    /// For an API-key lease: the SHA-256 of its key's secret part, once the key was handed out.
    pub secret_sha256: Option<Vec<u8>>,
}

/// The lease of an API key that was handed out, with what introspection needs of it.
#[derive(Clone, Debug)]
pub struct ApiKeyRecord {
    /// Its `secret_sha256` is set.
    pub lease: LeaseRecord,
    /// The holder's name and SPIFFE ID.
    pub workload_name: String,
    pub spiffe_id: String,
}

/// What [`Store::insert_task`](super::Store::insert_task) did.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum TaskInsertion {
    Inserted,
    /// The workload already used the task's idempotency key; nothing was stored.
    KeyTaken,
    /// The workload's identity was revoked (the kill switch committed first); nothing was
    /// stored, so no task can open after the kill switch has listed the ones to revoke.
    IdentityRevoked,
}

/// What [`Store::add_lease`](super::Store::add_lease) did.
#[derive(Debug, PartialEq, Eq)]
pub enum NewLeaseOutcome {
    Added,
    /// The task is not active (completed, expired, revoked, or past its deadline).
    TaskNotActive,
}

/// A grant request waiting for (or decided by) operators.
#[derive(Clone, Debug)]
pub struct GrantRequestRecord {
    /// Also the id of the lease the quorum's approval issues.
    pub id: LeaseId,
    pub task_id: TaskId,
    pub workload_id: String,
    pub workload_name: String,
    pub scope: ScopeName,
    /// As asked; 0 for the scope's default.
    pub ttl_seconds: u32,
    /// SHA-256 (hex) of the exact request; every approval is bound to it.
    pub request_digest: String,
    /// What operators see to judge it (purpose, context, risk, the policies' reasons), JSON.
    pub detail_json: String,
    pub quorum: u32,
    /// Labels (`key=value`) every approver must carry.
    pub approver_labels: Vec<String>,
    pub state: GrantRequestState,
    pub created_at: UnixMillis,
    /// Undecided by then, it expires.
    pub wait_until: UnixMillis,
    pub decided_at: Option<UnixMillis>,
    /// Why it was denied, expired or cancelled.
    pub reason: Option<String>,
    /// The operators' answers so far, oldest first.
    pub approvals: Vec<ApprovalRecord>,
}

/// One operator's answer to a grant request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalRecord {
    pub approver_id: String,
    pub approver_name: String,
    pub verdict: Verdict,
    pub reason: String,
    pub decided_at: UnixMillis,
}

/// What [`Store::insert_grant_request`](super::Store::insert_grant_request) did.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum GrantRequestInsertion {
    Inserted,
    /// The task is not active; nothing was stored.
    TaskNotActive,
    /// The workload already has this many requests waiting; nothing was stored.
    TooManyPending(u32),
}

/// An operator's answer to store, with what it leads to.
#[derive(Clone, Debug)]
pub struct GrantDecision {
    pub request_id: LeaseId,
    pub approval: ApprovalRecord,
    /// For an approval: the lease to insert if it completes the quorum (its window starts
    /// now). `None` for a denial.
    pub lease: Option<LeaseRecord>,
    /// Written with the answer whatever it leads to.
    pub events: Vec<AuditEvent>,
    /// Written too when the lease is issued.
    pub issued_events: Vec<AuditEvent>,
}

/// What [`Store::decide_grant_request`](super::Store::decide_grant_request) did.
#[derive(Debug, PartialEq, Eq, Clone)]
pub enum GrantDecisionOutcome {
    /// Recorded; this many distinct operators approve so far.
    Recorded {
        approvals: u32,
    },
    /// This operator had approved already: counted once, nothing changed. (A denial after
    /// one's own approval replaces it and ends the request.)
    AlreadyAnswered,
    /// The answer completed the quorum: the lease is issued.
    Issued,
    Denied,
    /// No such request.
    Unknown,
    /// Already decided, expired or cancelled (nothing changed), in this state.
    NotPending(GrantRequestState),
    /// Its wait ended before this answer: now expired.
    Expired,
    /// Its task ended first: now cancelled.
    TaskEnded,
}

/// A renewal to store: the lease moves to `window`, its token now signed by `kid`.
#[derive(Clone, Debug)]
pub struct Renewal {
    pub lease_id: LeaseId,
    /// The lease's task: a renewal locks it first, like every write that touches a task's leases.
    pub task_id: TaskId,
    pub window: LeaseWindow,
    pub kid: String,
    pub now: UnixMillis,
}

/// What [`Store::renew_lease`](super::Store::renew_lease) did.
#[derive(Debug, PartialEq, Eq)]
pub enum RenewalOutcome {
    Renewed,
    /// The lease is no longer issued, has already expired, or its task has ended.
    NotRenewable,
}

/// A lease that a completion, revocation or expiry has just ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndedLease {
    pub id: LeaseId,
    pub scope: String,
    /// When its credential expires (or expired).
    pub not_after: UnixMillis,
}

/// The leases among `events` (task-level events name none).
pub fn ended_leases(events: &[FeedEvent]) -> Vec<EndedLease> {
    events
        .iter()
        .filter_map(|event| {
            Some(EndedLease {
                id: LeaseId::from_stored(event.lease_id.clone()?),
                scope: event.scope.clone().unwrap_or_default(),
                not_after: event.not_after,
            })
        })
        .collect()
}

/// What [`Store::complete_task`](super::Store::complete_task) did.
#[derive(Debug)]
pub enum CompletionOutcome {
    Completed {
        revoked: Vec<EndedLease>,
        ended_at: UnixMillis,
    },
    AlreadyEnded(TaskRecord),
    NotFound,
}

/// Leases and tasks the reaper ended in one pass.
#[derive(Debug, Default)]
pub struct ExpiryReport {
    pub leases: Vec<EndedLease>,
    pub tasks: usize,
}

/// One revocation: a lease (`lease_id` set) or a whole task (`lease_id` empty) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedEvent {
    pub lease_id: Option<String>,
    pub task_id: String,
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub reason: RevocationReason,
    /// When the concerned tokens expire anyway: for a lease its expiry, for a task the latest
    /// expiry of its leases (no lease can be added once the task has ended).
    pub not_after: UnixMillis,
    pub occurred_at: UnixMillis,
}

/// The feed event that records the end of task `task_id`, whose issued leases `lease_events`
/// has just ended: valid until the latest of their expiries, since no lease can be added to an
/// ended task (and leases ended earlier have events of their own).
pub fn task_ended(
    task_id: &str,
    reason: RevocationReason,
    lease_events: &[FeedEvent],
    now: UnixMillis,
) -> FeedEvent {
    let not_after = lease_events
        .iter()
        .map(|event| event.not_after)
        .fold(now, UnixMillis::max);
    FeedEvent {
        lease_id: None,
        task_id: task_id.to_owned(),
        scope: None,
        audience: None,
        reason,
        not_after,
        occurred_at: now,
    }
}

/// An event with its position in the feed. Positions only grow, and resuming after one never
/// skips an event, however late the transaction that wrote it committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedRecord {
    pub cursor: u64,
    pub event: FeedEvent,
}

/// Events after a cursor, as far as the feed can vouch for them now.
#[derive(Clone, Debug, Default)]
pub struct FeedPage {
    pub records: Vec<FeedRecord>,
    /// Where to resume after this page (the last record's cursor, or the cursor asked for).
    pub cursor: u64,
    /// Whether committed events wait beyond this page behind an older transaction that has not
    /// finished yet (PostgreSQL only): read again shortly.
    pub is_held_back: bool,
}

/// An audit event as stored; `seq` is `None` until it is sealed into the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: Option<i64>,
    pub event: SealedEvent,
}

/// A signed checkpoint of the chain head.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub seq: i64,
    pub head_hash: String,
    pub kid: String,
    pub signature: Vec<u8>,
}

/// Which events an investigation wants; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub task_id: Option<String>,
    pub workload: Option<String>,
    pub scope: Option<String>,
    pub event_type: Option<String>,
    pub since: Option<UnixMillis>,
    pub until: Option<UnixMillis>,
    pub limit: i64,
}

/// The error for a stored value the code cannot read back: a damaged or foreign database.
pub fn corrupt(column: &str, value: &str) -> Error {
    Error::internal(format!(
        "unreadable stored value in column {column}: {value:?}"
    ))
}

/// Role names as stored: space-separated.
pub fn roles_text(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|role| role.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses stored role names.
pub fn parse_roles(text: &str) -> Result<Vec<Role>, Error> {
    text.split_whitespace()
        .map(|role| Role::parse(role).ok_or_else(|| corrupt("workloads.roles", role)))
        .collect()
}

/// Parses the stored text columns every backend keeps the same way.
pub fn parse_stored<T>(
    column: &str,
    text: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, Error> {
    parse(text).ok_or_else(|| corrupt(column, text))
}

/// A task context stored as JSON.
pub fn parse_context(text: &str) -> Result<TaskContext, Error> {
    serde_json::from_str(text).map_err(|_| corrupt("tasks.context_json", text))
}

/// Decodes the fields of a stored lease row, in the order of every backend's lease columns.
pub struct LeaseColumns {
    pub id: String,
    pub task_id: String,
    pub scope: String,
    pub kind: String,
    pub audience: String,
    pub state: String,
    pub kid: Option<String>,
    pub issued_at: i64,
    pub expires_at: i64,
    pub renewable_until: i64,
    pub ended_at: Option<i64>,
    pub secret_sha256: Option<Vec<u8>>,
}

impl LeaseColumns {
    pub fn into_record(self) -> Result<LeaseRecord, Error> {
        Ok(LeaseRecord {
            id: LeaseId::from_stored(self.id),
            task_id: TaskId::from_stored(self.task_id),
            scope: ScopeName::parse("leases.scope", &self.scope)
                .map_err(|_| corrupt("leases.scope", &self.scope))?,
            kind: parse_stored("leases.kind", &self.kind, CredentialKind::parse)?,
            audience: self.audience,
            state: parse_stored("leases.state", &self.state, LeaseState::from_stored)?,
            kid: self.kid,
            window: LeaseWindow {
                issued_at: UnixMillis(self.issued_at),
                expires_at: UnixMillis(self.expires_at),
                renewable_until: UnixMillis(self.renewable_until),
            },
            ended_at: self.ended_at.map(UnixMillis),
            secret_sha256: self.secret_sha256,
        })
    }
}

/// Decodes the fields of a stored task row.
pub struct TaskColumns {
    pub id: String,
    pub workload_id: String,
    pub purpose: String,
    pub context_json: String,
    pub state: String,
    pub created_at: i64,
    pub deadline: i64,
    pub ended_at: Option<i64>,
    pub idempotency_key: Option<String>,
    pub request_digest: Option<String>,
}

impl TaskColumns {
    pub fn into_record(self) -> Result<TaskRecord, Error> {
        Ok(TaskRecord {
            id: TaskId::from_stored(self.id),
            workload_id: self.workload_id,
            purpose: self.purpose,
            context: parse_context(&self.context_json)?,
            state: parse_stored("tasks.state", &self.state, TaskState::from_stored)?,
            created_at: UnixMillis(self.created_at),
            deadline: UnixMillis(self.deadline),
            ended_at: self.ended_at.map(UnixMillis),
            idempotency_key: self.idempotency_key,
            request_digest: self.request_digest,
        })
    }
}

/// Decodes the fields of a stored workload row.
pub struct WorkloadColumns {
    pub id: String,
    pub name: String,
    pub spiffe_id: String,
    pub roles: String,
    pub created_at: i64,
    /// Space-separated.
    pub audiences: String,
    /// Space-separated.
    pub selectors: String,
    pub revoked_at: Option<i64>,
    /// A JSON object.
    pub labels: String,
    pub deleted_at: Option<i64>,
}

impl WorkloadColumns {
    pub fn into_record(self) -> Result<WorkloadRecord, Error> {
        Ok(WorkloadRecord {
            id: self.id,
            name: WorkloadName::parse("workloads.name", &self.name)
                .map_err(|_| corrupt("workloads.name", &self.name))?,
            spiffe_id: SpiffeId::from_stored(self.spiffe_id),
            roles: parse_roles(&self.roles)?,
            audiences: self
                .audiences
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            selectors: self
                .selectors
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            created_at: UnixMillis(self.created_at),
            revoked_at: self.revoked_at.map(UnixMillis),
            labels: Labels::from_stored_json(&self.labels)
                .ok_or_else(|| corrupt("workloads.labels", &self.labels))?,
            deleted_at: self.deleted_at.map(UnixMillis),
        })
    }
}

/// Decodes the fields of a stored signing key row.
pub struct KeyColumns {
    pub kid: String,
    pub algorithm: String,
    pub public_key: Vec<u8>,
    pub sealed_private_key: Vec<u8>,
    pub created_at: i64,
    pub retired_at: Option<i64>,
    pub publish_until: Option<i64>,
    pub activated_at: Option<i64>,
}

impl KeyColumns {
    pub fn into_record(self) -> Result<StoredSigningKey, Error> {
        Ok(StoredSigningKey {
            algorithm: parse_stored(
                "signing_keys.algorithm",
                &self.algorithm,
                KeyAlgorithm::from_jws_name,
            )?,
            kid: self.kid,
            public_key: self.public_key,
            sealed_private_key: self.sealed_private_key,
            created_at: UnixMillis(self.created_at),
            activated_at: self.activated_at.map(UnixMillis),
            retired_at: self.retired_at.map(UnixMillis),
            publish_until: self.publish_until.map(UnixMillis),
        })
    }
}

/// Decodes the fields of a stored feed row.
pub struct FeedColumns {
    pub lease_id: Option<String>,
    pub task_id: String,
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub reason: String,
    pub not_after: i64,
    pub occurred_at: i64,
}

impl FeedColumns {
    pub fn into_event(self) -> Result<FeedEvent, Error> {
        Ok(FeedEvent {
            lease_id: self.lease_id,
            task_id: self.task_id,
            scope: self.scope,
            audience: self.audience,
            reason: parse_stored(
                "revocation_feed.reason",
                &self.reason,
                RevocationReason::from_stored,
            )?,
            not_after: UnixMillis(self.not_after),
            occurred_at: UnixMillis(self.occurred_at),
        })
    }
}

/// The refusal of a CA rotation that lost a race with another.
pub const CA_CHANGED_DURING_ROTATION: &str =
    "the CA changed during rotation (another rotation ran); retry";

/// Why a grant request expired, as recorded.
pub const GRANT_NOT_DECIDED_IN_TIME: &str = "not decided in time";
/// Why a grant request was cancelled, as recorded.
pub const GRANT_TASK_ENDED: &str = "its task ended";

/// The columns of a stored grant request, in the order both backends select them.
pub const GRANT_REQUEST_COLUMNS: &str = "id, task_id, workload_id, workload_name, scope, \
     ttl_seconds, request_digest, detail_json, quorum, approver_labels_json, state, created_at, \
     wait_until, decided_at, reason";

/// Which pending requests a listing shows: `None` matches every workload, every scope.
#[derive(Clone, Debug, Default)]
pub struct PendingFilter {
    pub workload: Option<String>,
    pub scope: Option<String>,
    /// One task's requests.
    pub task: Option<String>,
}

/// The columns of a stored approval.
pub const APPROVAL_COLUMNS: &str = "approver_id, approver_name, verdict, reason, decided_at";

/// Decodes the fields of a stored grant request row.
pub struct GrantRequestColumns {
    pub id: String,
    pub task_id: String,
    pub workload_id: String,
    pub workload_name: String,
    pub scope: String,
    pub ttl_seconds: i64,
    pub request_digest: String,
    pub detail_json: String,
    pub quorum: i64,
    pub approver_labels_json: String,
    pub state: String,
    pub created_at: i64,
    pub wait_until: i64,
    pub decided_at: Option<i64>,
    pub reason: Option<String>,
}

impl GrantRequestColumns {
    pub fn into_record(self, approvals: Vec<ApprovalRecord>) -> Result<GrantRequestRecord, Error> {
        let unreadable = |column: &str| {
            Error::internal(format!(
                "grant_requests.{column}: not a value Warrant writes"
            ))
        };
        Ok(GrantRequestRecord {
            id: LeaseId::from_stored(self.id),
            task_id: TaskId::from_stored(self.task_id),
            workload_id: self.workload_id,
            workload_name: self.workload_name,
            scope: ScopeName::parse("grant_requests.scope", &self.scope)
                .map_err(|_| corrupt("grant_requests.scope", &self.scope))?,
            ttl_seconds: u32::try_from(self.ttl_seconds).map_err(|_| unreadable("ttl_seconds"))?,
            request_digest: self.request_digest,
            detail_json: self.detail_json,
            quorum: u32::try_from(self.quorum).map_err(|_| unreadable("quorum"))?,
            approver_labels: serde_json::from_str(&self.approver_labels_json)
                .map_err(|_| unreadable("approver_labels_json"))?,
            state: parse_stored(
                "grant_requests.state",
                &self.state,
                GrantRequestState::from_stored,
            )?,
            created_at: UnixMillis(self.created_at),
            wait_until: UnixMillis(self.wait_until),
            decided_at: self.decided_at.map(UnixMillis),
            reason: self.reason,
            approvals,
        })
    }
}

/// Decodes the fields of a stored approval row.
pub struct ApprovalColumns {
    pub approver_id: String,
    pub approver_name: String,
    pub verdict: String,
    pub reason: String,
    pub decided_at: i64,
}

impl ApprovalColumns {
    pub fn into_record(self) -> Result<ApprovalRecord, Error> {
        Ok(ApprovalRecord {
            approver_id: self.approver_id,
            approver_name: self.approver_name,
            verdict: parse_stored(
                "grant_approvals.verdict",
                &self.verdict,
                Verdict::from_stored,
            )?,
            reason: self.reason,
            decided_at: UnixMillis(self.decided_at),
        })
    }
}
