//! The broker's decisions: who gets which lease for how long, and what ends when. The gRPC layer
//! hands it validated domain values; it decides, persists the change together with its audit
//! events in one transaction, and only then returns credentials. Refusals are recorded too.

mod api_keys;
mod approvals;
mod grant_decision;
mod identity;
mod token_use;
pub mod tool_calls;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::audit::{AuditEvent, AuditKey, BOOTSTRAP, REAPER};
use crate::caller_limits::{Admitted, CallerLimitSettings, CallerLimits};
use crate::domain::task::{LeaseWindow, NewGrant, NewTask, parse_ttl_seconds};
use crate::domain::tool::{CALL_SCOPE_PREFIX, CallBinding};
use crate::domain::{
    Caller, Catalog, CredentialKind, Labels, LeaseId, LeaseState, Role, ScopeDefinition, ScopeName,
    SpiffeId, TaskId, TaskState, TrustDomain, UnixMillis, WorkloadName,
};
use crate::error::{Error, Result};
use crate::feed::Feed;
use crate::grpc::CredentialCache;
use crate::identity::jwt_attestor::JwtAttestor;
use crate::identity::{Ca, CaRotation, IdentityAuthority};
use crate::issuer::jwt::{self, AccessTokenClaims, Expectations};
use crate::issuer::keyring::Rotation;
use crate::issuer::verified_tokens::VerifiedTokens;
use crate::issuer::{BearerCredential, Keyring, SigningKey};
use crate::metrics::{
    CredentialLabels, LimitLabels, Metrics, OperationLabels, ResultLabels, ScopeLabels,
};
use crate::policy::{PolicyEngine, PolicySummary};
use crate::store::{
    CompletionOutcome, EndedLease, GrantRequestRecord, LeaseRecord, NewLeaseOutcome, PendingFilter,
    Renewal, RenewalOutcome, SharedStore, TaskInsertion, TaskRecord, WorkloadRecord,
};
pub use approvals::{GrantAnswer, GrantStatus};
use approvals::{HeldGrant, MAX_PENDING_PER_WORKLOAD};
use grant_decision::{GrantAsk, PolicyAnswer, Refused};
pub use identity::RevokedIdentity;
use token_use::Inactive;
pub use token_use::IntendedUse;

/// The longest audience an introspection may name.
pub const MAX_AUDIENCE_BYTES: usize = 512;

/// The most audiences one resource server may serve.
const MAX_AUDIENCES_PER_WORKLOAD: usize = 16;

/// The `scope` label of a refused request for a scope the catalog does not define.
pub const UNKNOWN_SCOPE_LABEL: &str = "unknown";

/// Fixed settings the broker decides with.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// The `iss` of every token.
    pub issuer: String,
    pub trust_domain: TrustDomain,
    /// The longest task lifetime a request may ask for.
    pub max_task_ttl: Duration,
    /// How often an idle revocation feed subscriber receives a heartbeat.
    pub feed_heartbeat_interval: Duration,
    /// How much one caller may do.
    pub caller_limits: CallerLimitSettings,
    /// How long an X.509-SVID is valid.
    pub svid_ttl: Duration,
    /// Whether callers may authenticate with bearer credentials (the bootstrap a production
    /// deployment can switch off once its workloads attest).
    pub bearer_credentials: bool,
    /// Whether each request that starts to wait for operators is announced by the approval
    /// webhook (a delivery job stored with it).
    pub approval_webhook: bool,
}

/// The broker: catalog, keys and store, shared by every request.
pub struct Broker {
    store: SharedStore,
    /// Authenticated workload credentials, kept until a workload changes.
    credentials: CredentialCache,
    /// Each caller's rate and concurrency allowance.
    caller_limits: CallerLimits,
    /// Paces the audit records of refused attestations.
    failure_audit: CallerLimits,
    /// Each attesting peer's allowance, with the per-caller settings: attestation needs no
    /// identity, so its caller is where it comes from (the peer's IP address, or its uid on
    /// the local socket).
    attestation_limits: CallerLimits,
    /// Signs X.509-SVIDs.
    ca: Ca,
    /// Checks external JWTs for the `jwt` attestor.
    jwt_attestor: JwtAttestor,
    audit_key: AuditKey,
    keyring: Keyring,
    catalog: Catalog,
    policy: PolicyEngine,
    feed: Feed,
    settings: BrokerSettings,
    metrics: Arc<Metrics>,
    /// Tokens introspection has found well signed, so that checking one again skips the
    /// signature verification.
    verified_tokens: VerifiedTokens,
}

/// What decides grant requests: the scope catalog, then the policy set.
pub struct GrantRules {
    pub catalog: Catalog,
    pub policy: PolicyEngine,
}

/// A secret credential in clear, on its way to its workload. `Debug` never shows it.
pub struct Credential(String);

impl Credential {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential([redacted])")
    }
}

/// A lease and, while it is issued, its credential.
#[derive(Debug)]
pub struct IssuedLease {
    pub record: LeaseRecord,
    pub credential: Option<Credential>,
}

/// The answer to `BeginTask`.
#[derive(Debug)]
pub struct OpenedTask {
    pub task: TaskRecord,
    pub leases: Vec<IssuedLease>,
    /// The requests for scopes that wait for operators (follow each with `WatchGrant`).
    pub pending: Vec<GrantRequestRecord>,
    /// Whether this replays an earlier request with the same idempotency key.
    pub replayed: bool,
}

/// A workload to register, validated by the caller.
pub struct NewWorkload {
    pub name: WorkloadName,
    pub roles: Vec<Role>,
    /// The audiences a `resource_server` serves.
    pub audiences: Vec<String>,
    /// What it must prove to the `unix` attestor ([`crate::identity::selectors::parse`]).
    pub selectors: Vec<String>,
    /// Whether it gets a bearer credential.
    pub with_credential: bool,
    /// Its SPIFFE ID; `None` for the one derived from its name.
    pub spiffe_id: Option<SpiffeId>,
    /// What policy reads of it.
    pub labels: Labels,
}

/// The answer to `CompleteTask`.
#[derive(Debug)]
pub struct CompletedTask {
    pub task_id: TaskId,
    pub state: TaskState,
    pub revoked: Vec<LeaseId>,
    pub ended_at: UnixMillis,
    pub already_completed: bool,
}

/// A lease of `task` for `scope` issued at `now` (for `ttl`, else the scope's default, within
/// the task's deadline), its tokens signed by `key`.
fn issued_lease_record(
    id: LeaseId,
    task: &TaskRecord,
    scope: &ScopeDefinition,
    ttl: Option<Duration>,
    now: UnixMillis,
    key: &SigningKey,
) -> LeaseRecord {
    LeaseRecord {
        id,
        task_id: task.id.clone(),
        scope: scope.name.clone(),
        kind: scope.kind,
        audience: scope.audience.clone(),
        state: LeaseState::Issued,
        kid: Some(key.kid().to_owned()),
        window: LeaseWindow::new(now, scope, ttl, task.deadline),
        ended_at: None,
        secret_sha256: None,
    }
}

/// Whether a lease is issued and unexpired at `now`: one whose credential may be handed out.
fn is_live(record: &LeaseRecord, now: UnixMillis) -> bool {
    record.state == LeaseState::Issued && record.window.expires_at > now
}

/// One introspection: the token, the audience the caller serves, and what it knows of the use.
pub struct Introspection<'a> {
    pub token: &'a str,
    pub audience: &'a str,
    /// The `x5t#S256` of the client certificate the token came with.
    pub client_certificate_thumbprint: Option<&'a str>,
    /// What the caller is about to do with the token, for the `UseToken` policy.
    pub intended_use: Option<IntendedUse>,
}

/// A token introspection found active for this use.
#[derive(Debug)]
pub struct ActiveToken {
    pub claims: AccessTokenClaims,
    /// For a lease limited in uses: the uses counted so far, this one included.
    pub uses: Option<u32>,
}

/// What an admin revokes.
#[derive(Debug, Clone)]
pub enum RevocationTarget {
    Lease(LeaseId),
    Task(TaskId),
    /// Every active task of the workload, with their leases; its identity stays.
    Workload(WorkloadName),
    /// Every issued lease of the scope (or of a tool's call tokens, `tool:<name>`).
    Scope(ScopeName),
}

/// How many leases a revocation by scope reads at a time.
const REVOCATION_BATCH: usize = 256;

impl Broker {
    pub fn new(
        store: SharedStore,
        audit_key: AuditKey,
        keyring: Keyring,
        rules: GrantRules,
        identity: IdentityAuthority,
        settings: BrokerSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Broker {
            attestation_limits: CallerLimits::new(settings.caller_limits),
            failure_audit: CallerLimits::new(CallerLimitSettings {
                rate_per_second: identity::REFUSALS_AUDITED_PER_SECOND,
                burst: 2 * identity::REFUSALS_AUDITED_PER_SECOND,
                concurrency: u32::MAX,
            }),
            ca: identity.ca,
            jwt_attestor: identity.jwt_attestor,
            credentials: CredentialCache::new(store.clone(), settings.bearer_credentials),
            caller_limits: CallerLimits::new(settings.caller_limits),
            feed: Feed::new(
                store.clone(),
                metrics.clone(),
                settings.feed_heartbeat_interval,
            ),
            store,
            audit_key,
            keyring,
            catalog: rules.catalog,
            policy: rules.policy,
            settings,
            metrics,
            verified_tokens: VerifiedTokens::default(),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Runs a store operation, recording its latency.
    async fn timed<T>(&self, operation: &'static str, work: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let outcome = work.await;
        let labels = OperationLabels {
            operation: operation.to_owned(),
        };
        self.metrics
            .store_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    fn count_issued(&self, lease: &IssuedLease) {
        let labels = CredentialLabels {
            kind: lease.record.kind.as_str().to_owned(),
            scope: lease.record.scope.to_string(),
        };
        self.metrics.credentials_issued.get_or_create(&labels).inc();
    }

    /// Counts a refused request by scope. A scope the catalog does not define counts as
    /// `unknown`: a label takes only catalog values, so a client inventing names cannot
    /// create one series per name.
    fn count_denied(&self, scope: &ScopeName) {
        let scope = if self.catalog.contains(scope) {
            scope.to_string()
        } else {
            UNKNOWN_SCOPE_LABEL.to_owned()
        };
        self.metrics
            .credentials_denied
            .get_or_create(&ScopeLabels { scope })
            .inc();
    }

    fn count_revoked(&self, ended: &[EndedLease], reason: &str) {
        for lease in ended {
            self.metrics.revoked(&lease.scope, reason, 1);
        }
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    pub fn credentials(&self) -> &CredentialCache {
        &self.credentials
    }

    /// Admits one call of `caller` under its rate and concurrency limits; the call holds the
    /// answer until it has been answered. A refusal is counted by the limit it hit.
    pub fn admit(&self, caller: &Caller) -> Result<Admitted> {
        self.counted(self.caller_limits.admit(&caller.workload_id))
    }

    /// [`Broker::admit`] for an attestation from `peer`, which has no identity yet.
    pub fn admit_attestation(&self, peer: &str) -> Result<Admitted> {
        self.counted(self.attestation_limits.admit(peer))
    }

    /// An admission's outcome, a refusal counted by the limit it hit.
    fn counted(
        &self,
        admission: std::result::Result<Admitted, (crate::caller_limits::Limit, Error)>,
    ) -> Result<Admitted> {
        admission.map_err(|(limit, error)| {
            let labels = LimitLabels {
                limit: limit.label().to_owned(),
            };
            self.metrics.calls_limited.get_or_create(&labels).inc();
            error
        })
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    pub fn feed(&self) -> &Feed {
        &self.feed
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    pub fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    /// The value the audit trail holds for `secret`.
    pub fn audit_hash(&self, secret: &str) -> String {
        self.audit_key.hash(secret)
    }

    /// Opens a task and issues a lease for each requested scope; all scopes must be allowed.
    pub async fn begin_task(&self, caller: &Caller, request: NewTask) -> Result<OpenedTask> {
        if let Some(key) = &request.idempotency_key
            && let Some(existing) = self
                .store
                .find_task_by_idempotency_key(&caller.workload_id, key)
                .await?
        {
            return self.replay(caller, existing, &request).await;
        }
        let now = UnixMillis::now();
        let task_id = TaskId::generate(now);
        let context_json = request.context.to_json();
        let mut events = Vec::new();
        let mut definitions = Vec::new();
        // Scopes policy steps up: held for operators once the task is stored.
        let mut held = Vec::new();
        for (index, scope) in request.scopes.iter().enumerate() {
            let field = format!("scopes[{index}]");
            let checked = self
                .catalog_check(caller, &task_id, &field, scope)
                .and_then(|definition| {
                    let ask = GrantAsk {
                        field: &field,
                        task_id: &task_id,
                        purpose: &request.purpose,
                        context: &request.context,
                        ttl: None,
                        risk: request.risk,
                        now,
                    };
                    self.policy_check(caller, definition, &ask)
                        .map(|answer| (definition, answer))
                });
            match checked {
                Ok((definition, PolicyAnswer::Allow(event))) => {
                    events.push(event.context(&context_json));
                    definitions.push(definition);
                }
                Ok((_, PolicyAnswer::StepUp(event, requirement))) => {
                    held.push((scope, event.context(&context_json), requirement));
                }
                Err(refused) => {
                    let Refused { error, event } = *refused;
                    events.push(event.context(&context_json));
                    let refused = AuditEvent::new("task.refused", "denied", caller.name.as_str())
                        .workload(&caller.name)
                        .task(&task_id)
                        .context(&context_json)
                        .with("purpose", request.purpose.as_str())
                        .with("reason", error.to_string());
                    events.push(refused);
                    return self.refuse(scope, error, events).await;
                }
            }
        }
        let task = TaskRecord {
            id: task_id,
            workload_id: caller.workload_id.clone(),
            purpose: request.purpose.clone(),
            context: request.context.clone(),
            state: TaskState::Active,
            created_at: now,
            deadline: now.plus(request.ttl).floor_to_second(),
            ended_at: None,
            idempotency_key: request.idempotency_key.clone(),
            request_digest: request
                .idempotency_key
                .as_ref()
                .map(|_| request.request_digest()),
        };
        events.push(
            AuditEvent::new("task.begun", "ok", caller.name.as_str())
                .workload(&caller.name)
                .task(&task.id)
                .context(&context_json)
                .with("purpose", task.purpose.as_str())
                .with("deadline", task.deadline.0)
                .with(
                    "scopes",
                    request
                        .scopes
                        .iter()
                        .map(ScopeName::as_str)
                        .collect::<Vec<_>>(),
                ),
        );
        let key = self.keyring.current();
        let leases: Vec<IssuedLease> = definitions
            .into_iter()
            .map(|definition| self.issue(caller, &task, definition, None, now, &key))
            .collect();
        events.extend(leases.iter().map(|lease| {
            self.issuance_event(caller, "lease.issued", lease)
                .context(&context_json)
        }));
        let records: Vec<LeaseRecord> = leases.iter().map(|lease| lease.record.clone()).collect();
        match self
            .timed(
                "insert_task",
                self.store.insert_task(task.clone(), records, events),
            )
            .await?
        {
            TaskInsertion::Inserted => {}
            TaskInsertion::IdentityRevoked => {
                return Err(Error::Unauthenticated(
                    "the caller's identity was revoked".into(),
                ));
            }
            // A concurrent call with the same idempotency key committed first: answer as a retry.
            TaskInsertion::KeyTaken => {
                let key = task.idempotency_key.as_deref().unwrap_or_default();
                let existing = self
                    .store
                    .find_task_by_idempotency_key(&caller.workload_id, key)
                    .await?
                    .ok_or_else(|| {
                        Error::internal(
                            "task insert conflicted but no task holds its idempotency key",
                        )
                    })?;
                return self.replay(caller, existing, &request).await;
            }
        }
        leases.iter().for_each(|lease| self.count_issued(lease));
        tracing::debug!(task_id = %task.id, workload = %caller.name, leases = leases.len(), "task opened");
        // Each after the task, which it needs. A request refused here (the workload's cap)
        // fails the call; the task is open, and a retry with the idempotency key answers it.
        let mut pending = Vec::with_capacity(held.len());
        for (scope, event, requirement) in held {
            let grant = HeldGrant {
                task: &task,
                scope,
                ttl_seconds: 0,
                risk: request.risk,
                requirement,
                call: None,
            };
            pending.push(self.hold_for_approval(caller, grant, event, now).await?);
        }
        Ok(OpenedTask {
            task,
            leases,
            pending,
            replayed: false,
        })
    }

    /// Adds a lease for `scope` to an active task of the caller.
    pub async fn request_grant(&self, caller: &Caller, grant: NewGrant) -> Result<GrantAnswer> {
        let NewGrant {
            task_id,
            scope,
            ttl_seconds,
            risk,
        } = &grant;
        let definition = match self.catalog_check(caller, task_id, "scope", scope) {
            Ok(definition) => definition,
            Err(refused) => return self.refuse(scope, refused.error, vec![refused.event]).await,
        };
        let ttl = parse_ttl_seconds("ttl_seconds", *ttl_seconds, definition.max_ttl)?;
        let now = UnixMillis::now();
        let task = self.active_task(caller, task_id, now).await?;
        let context_json = task.context.to_json();
        let ask = GrantAsk {
            field: "scope",
            task_id,
            purpose: &task.purpose,
            context: &task.context,
            ttl,
            risk: *risk,
            now,
        };
        let decision_event = match self.policy_check(caller, definition, &ask) {
            Ok(PolicyAnswer::Allow(event)) => event.context(&context_json),
            Ok(PolicyAnswer::StepUp(event, requirement)) => {
                let held = HeldGrant {
                    task: &task,
                    scope,
                    ttl_seconds: *ttl_seconds,
                    risk: *risk,
                    requirement,
                    call: None,
                };
                return self
                    .hold_for_approval(caller, held, event.context(&context_json), now)
                    .await
                    .map(GrantAnswer::Pending);
            }
            Err(refused) => {
                let event = refused.event.context(&context_json);
                return self.refuse(scope, refused.error, vec![event]).await;
            }
        };
        let lease = self.issue(caller, &task, definition, ttl, now, &self.keyring.current());
        let events = vec![
            decision_event,
            self.issuance_event(caller, "lease.issued", &lease)
                .context(&context_json),
        ];
        match self
            .timed(
                "add_lease",
                self.store
                    .add_lease(&caller.workload_id, lease.record.clone(), now, events),
            )
            .await?
        {
            NewLeaseOutcome::Added => {
                self.count_issued(&lease);
                tracing::debug!(task_id = %task.id, lease_id = %lease.record.id, %scope, "lease issued");
                Ok(GrantAnswer::Issued(lease))
            }
            NewLeaseOutcome::TaskNotActive => Err(task_not_active(task_id)),
        }
    }

    /// The caller's task `task_id`, active at `now`: another workload's is not found, an
    /// ended one is refused.
    async fn active_task(
        &self,
        caller: &Caller,
        task_id: &TaskId,
        now: UnixMillis,
    ) -> Result<TaskRecord> {
        let task = self
            .store
            .find_task(task_id, &caller.workload_id)
            .await?
            .ok_or_else(|| task_id.not_found())?;
        ensure_task_active(&task, now)?;
        Ok(task)
    }

    /// Records a refused grant request and returns its refusal.
    async fn refuse<T>(
        &self,
        scope: &ScopeName,
        refusal: Error,
        events: Vec<AuditEvent>,
    ) -> Result<T> {
        self.count_denied(scope);
        self.timed("record_events", self.store.record_events(events))
            .await?;
        Err(refusal)
    }

    /// Reads the policy set again; `actor` is who asked (an admin, or `warrant/signal`). The
    /// outcome is audited before a new set decides; a refused set leaves the one in force.
    pub async fn reload_policy(&self, actor: &str) -> Result<PolicySummary> {
        let store = &self.store;
        let outcome = self
            .policy
            .reload(|outcome, in_force| {
                let event = match outcome {
                    Ok(summary) => AuditEvent::new("policy.reloaded", "ok", actor)
                        .with("source", summary.source.as_str())
                        .with("digest", summary.digest.as_str())
                        .with("previous_digest", in_force.digest.as_str())
                        .with("policies", summary.decision_policies.clone())
                        .with("approval_rules", summary.approval_rules.clone()),
                    Err(error) => AuditEvent::new("policy.reloaded", "refused", actor)
                        .with("reason", error.to_string())
                        .with("digest_in_force", in_force.digest.as_str()),
                };
                store.record_events(vec![event])
            })
            .await?;
        match outcome {
            Ok(summary) => {
                tracing::info!(digest = %summary.digest, policies = summary.decision_policies.len(), approval_rules = summary.approval_rules.len(), "policy reloaded");
                Ok(summary)
            }
            Err(error) => {
                tracing::warn!(%error, "policy reload refused; the set in force stays");
                Err(Error::FailedPrecondition(format!(
                    "policy refused, the set in force ({}) stays: {error}",
                    self.policy.current().summary.version()
                )))
            }
        }
    }

    /// Extends an issued lease of the caller and returns a fresh credential for it.
    pub async fn renew_lease(
        &self,
        caller: &Caller,
        lease_id: &LeaseId,
        ttl_seconds: u32,
    ) -> Result<IssuedLease> {
        let lease = self
            .store
            .find_lease(lease_id, &caller.workload_id)
            .await?
            .ok_or_else(|| lease_id.not_found())?;
        if lease.scope.as_str().starts_with(CALL_SCOPE_PREFIX) {
            return Err(Error::FailedPrecondition(format!(
                "lease_id: lease {lease_id} is a tool call's token, for one call: authorize the \
                 next call with AuthorizeToolCall instead of renewing it"
            )));
        }
        let definition = self.catalog.authorize(caller, "lease_id", &lease.scope)?;
        let ttl = parse_ttl_seconds("ttl_seconds", ttl_seconds, definition.max_ttl)?
            .unwrap_or(definition.default_ttl);
        let now = UnixMillis::now();
        if lease.state != LeaseState::Issued || lease.window.expires_at <= now {
            return Err(Error::FailedPrecondition(format!(
                "lease_id: lease {lease_id} is {}; only an issued, unexpired lease can be renewed",
                if lease.state == LeaseState::Issued {
                    "expired"
                } else {
                    lease.state.as_str()
                }
            )));
        }
        // Policy decides a renewal as it decides a new grant: a set reloaded since the lease was
        // issued, or a rule on lease lifetimes, applies to it too.
        let task = self
            .store
            .find_task(&lease.task_id, &caller.workload_id)
            .await?
            .ok_or_else(|| lease_id.not_found())?;
        let ask = GrantAsk {
            field: "lease_id",
            task_id: &task.id,
            purpose: &task.purpose,
            context: &task.context,
            ttl: Some(ttl),
            risk: None,
            now,
        };
        let checked = self
            .policy_check(caller, definition, &ask)
            .and_then(|answer| {
                answer.allowed_now(
                    "lease_id",
                    &lease.scope,
                    "a renewal cannot wait for approval: ask for a new grant with RequestGrant",
                )
            });
        let decision_event = match checked {
            Ok(event) => event,
            Err(refused) => {
                return self
                    .refuse(&lease.scope, refused.error, vec![refused.event])
                    .await;
            }
        };
        let window = lease
            .window
            .renewed(now, ttl)
            .ok_or_else(|| not_extended(lease_id, lease.window, now, ttl))?;
        let key = self.keyring.current();
        let record = LeaseRecord {
            window,
            kid: Some(key.kid().to_owned()),
            ..lease
        };
        let renewed = IssuedLease {
            credential: self.fresh_credential(caller, &record, &key),
            record,
        };
        let event = self.issuance_event(caller, "lease.renewed", &renewed);
        let renewal = Renewal {
            lease_id: lease_id.clone(),
            task_id: renewed.record.task_id.clone(),
            window,
            kid: key.kid().to_owned(),
            now,
        };
        match self
            .timed(
                "renew_lease",
                self.store.renew_lease(renewal, vec![decision_event, event]),
            )
            .await?
        {
            RenewalOutcome::Renewed => {
                let labels = CredentialLabels {
                    kind: renewed.record.kind.as_str().to_owned(),
                    scope: renewed.record.scope.to_string(),
                };
                self.metrics
                    .credentials_renewed
                    .get_or_create(&labels)
                    .inc();
                Ok(renewed)
            }
            RenewalOutcome::NotRenewable => Err(Error::FailedPrecondition(format!(
                "lease_id: lease {lease_id} ended while being renewed"
            ))),
        }
    }

    /// Completes the caller's task, revoking every lease it holds. Completing a completed task
    /// again is answered as a success that revoked nothing.
    pub async fn complete_task(&self, caller: &Caller, task_id: &TaskId) -> Result<CompletedTask> {
        let now = UnixMillis::now();
        match self
            .timed(
                "complete_task",
                self.store
                    .complete_task(task_id, &caller.workload_id, now, caller.name.as_str()),
            )
            .await?
        {
            CompletionOutcome::Completed { revoked, ended_at } => {
                self.count_revoked(&revoked, "task_completed");
                let revoked = revoked
                    .into_iter()
                    .map(|lease| lease.id)
                    .collect::<Vec<_>>();
                tracing::debug!(%task_id, revoked = revoked.len(), "task completed");
                Ok(CompletedTask {
                    task_id: task_id.clone(),
                    state: TaskState::Completed,
                    revoked,
                    ended_at,
                    already_completed: false,
                })
            }
            CompletionOutcome::AlreadyEnded(task) if task.state == TaskState::Completed => {
                Ok(CompletedTask {
                    task_id: task.id,
                    state: task.state,
                    revoked: Vec::new(),
                    ended_at: task.ended_at.unwrap_or(now),
                    already_completed: true,
                })
            }
            CompletionOutcome::AlreadyEnded(task) => Err(Error::FailedPrecondition(format!(
                "task_id: task {task_id} has already ended ({}); its leases were revoked then",
                task.state.as_str()
            ))),
            CompletionOutcome::NotFound => Err(task_id.not_found()),
        }
    }

    /// The claims of the token `request` names if it is active for its audience right now:
    /// well signed by a published key, unexpired, its lease issued and its task active, and
    /// this use allowed (its scope's use limit, the `UseToken` policy for an intended use).
    /// Otherwise inactive, with the reason when a check of this use refused a genuine token
    /// (its use limit, policy). Every check is recorded as a use check in the audit trail.
    pub async fn introspect(
        &self,
        caller: &Caller,
        request: &Introspection<'_>,
    ) -> Result<std::result::Result<ActiveToken, Option<String>>> {
        let Introspection {
            token,
            audience,
            client_certificate_thumbprint,
            intended_use,
        } = request;
        check_introspection_audience(caller, audience)?;
        let checked = if token.starts_with(crate::issuer::api_key::API_KEY_PREFIX) {
            self.check_api_key(token, audience).await?
        } else {
            self.check_token(token, audience).await?
        };
        let (outcome, notes) = match checked {
            Ok(claims) if !claims.is_usable_with(*client_certificate_thumbprint) => {
                (Err(Inactive::of(claims, "certificate_mismatch")), None)
            }
            Ok(claims) => {
                let (outcome, notes) = self
                    .check_use(caller, claims, intended_use.as_ref())
                    .await?;
                (outcome, Some(notes))
            }
            outcome => (outcome, None),
        };
        let mut event = AuditEvent::new("token.introspected", "inactive", caller.name.as_str())
            .with("audience", *audience)
            .with("token_hmac", self.audit_key.hash(token));
        if let Some(notes) = &notes {
            event = notes.annotate(event, intended_use.as_ref());
        }
        let verified_claims = match &outcome {
            Ok(claims) => Some(claims),
            Err(inactive) => inactive.verified_claims.as_ref(),
        };
        if let Some(claims) = verified_claims {
            event = event
                .task(&claims.task_id)
                .lease(&claims.jti)
                .scope(&claims.scope);
        }
        match &outcome {
            Ok(_) => event.outcome = "active",
            Err(inactive) => {
                tracing::debug!(reason = %inactive.reason, "introspection: token inactive");
                event = event.with("reason", inactive.reason.as_ref());
            }
        }
        let result = if outcome.is_ok() {
            "active"
        } else {
            "inactive"
        };
        self.metrics
            .introspections
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
        self.timed("record_events", self.store.record_events(vec![event]))
            .await?;
        Ok(outcome
            .map(|claims| ActiveToken {
                claims,
                uses: notes.and_then(|notes| notes.uses),
            })
            .map_err(|inactive| inactive.refused_use.then(|| inactive.reason.into_owned())))
    }

    /// Registers a workload and, if asked, makes its first bearer credential (without one, it
    /// authenticates only with SVIDs); `actor` is the admin asking.
    pub async fn create_workload(
        &self,
        actor: &str,
        new: NewWorkload,
    ) -> Result<(WorkloadRecord, Option<BearerCredential>)> {
        let NewWorkload {
            name,
            roles,
            audiences,
            selectors,
            with_credential,
            spiffe_id,
            labels,
        } = new;
        self.check_audiences(&roles, &audiences)?;
        let spiffe_id =
            spiffe_id.unwrap_or_else(|| SpiffeId::for_workload(&self.settings.trust_domain, &name));
        for other in self.store.list_workloads().await? {
            if other.spiffe_id == spiffe_id {
                return Err(Error::AlreadyExists(format!(
                    "spiffe_id: workload '{}' already has the SPIFFE ID {}",
                    other.name,
                    spiffe_id.as_str()
                )));
            }
            if !selectors.is_empty() && other.selectors == selectors {
                return Err(Error::AlreadyExists(format!(
                    "selectors: workload '{}' already has exactly these selectors, so an \
                     attested process could not tell the two apart",
                    other.name
                )));
            }
        }
        let now = UnixMillis::now();
        let workload = WorkloadRecord {
            id: format!(
                "wl_{}",
                crate::domain::ids::hex(&crate::issuer::random::bytes::<16>())
            ),
            spiffe_id,
            name,
            roles,
            audiences,
            selectors,
            created_at: now,
            revoked_at: None,
            labels,
            deleted_at: None,
        };
        let credential = with_credential.then(BearerCredential::generate);
        let mut event = AuditEvent::new("workload.created", "ok", actor)
            .workload(&workload.name)
            .with("spiffe_id", workload.spiffe_id.as_str())
            .with(
                "roles",
                workload
                    .roles
                    .iter()
                    .map(|role| role.as_str())
                    .collect::<Vec<_>>(),
            )
            .with("audiences", workload.audiences.clone())
            .with("selectors", workload.selectors.clone())
            .with("labels", workload.labels.to_value());
        if let Some((credential, stored)) = &credential {
            event = event
                .with("credential_id", stored.id.as_str())
                .with("credential_hmac", self.audit_key.hash(credential.expose()));
        }
        let stored = credential.as_ref().map(|(_, stored)| stored.clone());
        self.store
            .create_workload(workload.clone(), stored, vec![event])
            .await?;
        tracing::info!(workload = %workload.name, "workload registered");
        Ok((workload, credential.map(|(credential, _)| credential)))
    }

    /// A resource server serves at least one audience, each one a scope of the catalog issues
    /// tokens for (so a typo cannot leave it serving nothing); no other role has audiences.
    fn check_audiences(&self, roles: &[Role], audiences: &[String]) -> Result<()> {
        if !roles.contains(&Role::ResourceServer) {
            return match audiences.is_empty() {
                true => Ok(()),
                false => Err(Error::invalid(
                    "audiences",
                    "only a resource_server serves audiences",
                )),
            };
        }
        if audiences.is_empty() {
            return Err(Error::invalid(
                "audiences",
                "a resource_server needs at least one audience it serves",
            ));
        }
        if audiences.len() > MAX_AUDIENCES_PER_WORKLOAD {
            return Err(Error::invalid(
                "audiences",
                format!("holds more than {MAX_AUDIENCES_PER_WORKLOAD} audiences"),
            ));
        }
        for (index, audience) in audiences.iter().enumerate() {
            if !self.catalog.has_audience(audience) {
                return Err(Error::invalid(
                    format!("audiences[{index}]"),
                    format!(
                        "no scope of the catalog issues tokens for '{}'",
                        audience.chars().take(100).collect::<String>()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Gives workload `name` a new credential and revokes its others, in one transaction.
    pub async fn rotate_workload_credential(
        &self,
        caller: &Caller,
        name: &WorkloadName,
    ) -> Result<(WorkloadRecord, BearerCredential)> {
        let (credential, stored) = BearerCredential::generate();
        let event = AuditEvent::new("workload.credential_rotated", "ok", caller.name.as_str())
            .workload(name)
            .with("credential_id", stored.id.as_str())
            .with("credential_hmac", self.audit_key.hash(credential.expose()));
        let workload = self
            .store
            .replace_workload_credentials(name, Some(stored), UnixMillis::now(), vec![event])
            .await?
            .ok_or_else(|| no_such_workload(name))?;
        tracing::info!(workload = %workload.name, "workload credential rotated");
        Ok((workload, credential))
    }

    /// Revokes every credential of workload `name`; refused for the caller's own workload.
    pub async fn revoke_workload_credentials(
        &self,
        caller: &Caller,
        name: &WorkloadName,
    ) -> Result<WorkloadRecord> {
        if *name == caller.name {
            return Err(Error::FailedPrecondition(format!(
                "name: '{name}' is the calling workload; revoking its own credentials could leave \
                 no admin (ask another admin, or rotate instead)"
            )));
        }
        let event = AuditEvent::new("workload.credentials_revoked", "ok", caller.name.as_str())
            .workload(name);
        let workload = self
            .store
            .replace_workload_credentials(name, None, UnixMillis::now(), vec![event])
            .await?
            .ok_or_else(|| no_such_workload(name))?;
        tracing::info!(workload = %workload.name, "workload credentials revoked");
        Ok(workload)
    }

    /// On a store with no workloads, registers the `admin` workload; see [`crate::bootstrap`].
    pub async fn create_first_admin(&self, name: WorkloadName) -> Result<BearerCredential> {
        let (_, credential) = self
            .create_workload(
                BOOTSTRAP,
                NewWorkload {
                    name,
                    roles: vec![Role::Admin],
                    audiences: Vec::new(),
                    selectors: Vec::new(),
                    with_credential: true,
                    spiffe_id: None,
                    labels: Labels::default(),
                },
            )
            .await?;
        credential.ok_or_else(|| Error::internal("the first admin got no credential"))
    }

    /// Revokes a lease, a task with all its leases, every active task of a workload, or every
    /// issued lease of a scope, whoever owns them. A workload's or scope's revocation ends what
    /// is issued when it runs, one task or lease per transaction; what policy or the catalog
    /// still allows can be issued again after it.
    pub async fn revoke(&self, caller: &Caller, target: &RevocationTarget) -> Result<Vec<LeaseId>> {
        let now = UnixMillis::now();
        let actor = caller.name.as_str();
        // Each revocation's own event (an event's id is its own).
        let requested = || AuditEvent::new("revocation.requested", "ok", actor);
        let revoked = match target {
            RevocationTarget::Lease(id) => {
                let ended = self
                    .store
                    .revoke_lease(id, now, actor, vec![requested().lease(id)])
                    .await?
                    .ok_or_else(|| {
                        Error::FailedPrecondition(format!(
                            "lease_id: no issued lease {id} (unknown, expired or revoked)"
                        ))
                    })?;
                vec![ended]
            }
            RevocationTarget::Task(id) => self
                .store
                .revoke_task(id, now, actor, vec![requested().task(id)])
                .await?
                .ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "task_id: no active task {id} (unknown or already ended)"
                    ))
                })?,
            RevocationTarget::Workload(name) => {
                let workload = self
                    .store
                    .find_workload(name)
                    .await?
                    .ok_or_else(|| no_such_workload(name))?;
                let mut ended = Vec::new();
                for task in self.store.active_tasks_of(&workload.id).await? {
                    let event = requested().workload(name).task(&task);
                    // A task that ended meanwhile has nothing left to revoke.
                    if let Some(leases) = self
                        .store
                        .revoke_task(&task, now, actor, vec![event])
                        .await?
                    {
                        ended.extend(leases);
                    }
                }
                ended
            }
            RevocationTarget::Scope(scope) => {
                if self.catalog.lease_definition(scope).is_none() {
                    return Err(Error::invalid("scope", format!("unknown scope '{scope}'")));
                }
                let mut ended = Vec::new();
                loop {
                    let batch = self
                        .store
                        .issued_leases_of_scope(scope, REVOCATION_BATCH)
                        .await?;
                    let before = ended.len();
                    for id in &batch {
                        let event = requested().scope(scope).lease(id);
                        // One that ended meanwhile is skipped.
                        if let Some(lease) =
                            self.store.revoke_lease(id, now, actor, vec![event]).await?
                        {
                            ended.push(lease);
                        }
                    }
                    // Done when the batch was the last, or nothing in it could be revoked.
                    if batch.len() < REVOCATION_BATCH || ended.len() == before {
                        break;
                    }
                }
                ended
            }
        };
        self.count_revoked(&revoked, "revoked");
        tracing::info!(?target, revoked = revoked.len(), "revoked by admin");
        Ok(revoked.into_iter().map(|lease| lease.id).collect())
    }

    /// Switches signing to a new key; the old one stays published until its tokens expire.
    pub async fn rotate_signing_key(&self, caller: &Caller) -> Result<Rotation> {
        self.keyring
            .rotate(
                self.store.as_ref(),
                self.catalog.longest_max_ttl(),
                caller.name.as_str(),
            )
            .await
    }

    /// Makes a new CA that signs from `activation_delay` on and retires the current one
    /// ([`Ca::rotate`](crate::identity::Ca::rotate)).
    pub async fn rotate_ca(
        &self,
        caller: &Caller,
        activation_delay: Duration,
    ) -> Result<CaRotation> {
        self.ca
            .rotate(
                self.store.as_ref(),
                activation_delay,
                self.settings.svid_ttl,
                caller.name.as_str(),
            )
            .await
    }

    /// Rotates the CA when it is close to its expiry ([`Ca::rotate_if_expiring`]).
    pub async fn rotate_expiring_ca(&self, now: UnixMillis) -> Result<Option<CaRotation>> {
        self.ca
            .rotate_if_expiring(self.store.as_ref(), self.settings.svid_ttl, REAPER, now)
            .await
    }

    /// Expires every lease and task whose time has passed, announcing them on the feed.
    pub async fn expire_due(&self) -> Result<(usize, usize)> {
        const BATCH: usize = 500;
        self.expire_grant_requests().await?;
        let (mut leases, mut tasks) = (0, 0);
        loop {
            let now = UnixMillis::now();
            let report = self
                .timed("expire_due", self.store.expire_due(now, BATCH))
                .await?;
            if let Some(most_overdue) = report.leases.iter().map(|lease| lease.not_after).min() {
                self.metrics
                    .reaper_lag_seconds
                    .set((now.0 - most_overdue.0).max(0) as f64 / 1000.0);
            }
            self.count_revoked(&report.leases, "expired");
            leases += report.leases.len();
            tasks += report.tasks;
            if report.leases.len() < BATCH && report.tasks < BATCH {
                return Ok((leases, tasks));
            }
        }
    }

    /// Answers a retried `BeginTask`: same task, its current leases with fresh credentials.
    async fn replay(
        &self,
        caller: &Caller,
        task: TaskRecord,
        request: &NewTask,
    ) -> Result<OpenedTask> {
        if task.request_digest.as_deref() != Some(request.request_digest().as_str()) {
            return Err(Error::FailedPrecondition(format!(
                "idempotency_key: already used for a different request (task {})",
                task.id
            )));
        }
        let now = UnixMillis::now();
        ensure_task_active(&task, now)?;
        // A tool call's token is for its one call: a retry of BeginTask does not hand it again.
        let records: Vec<LeaseRecord> = self
            .store
            .leases_of_task(&task.id)
            .await?
            .into_iter()
            .filter(|record| !record.scope.as_str().starts_with(CALL_SCOPE_PREFIX))
            .collect();
        // A retry hands out fresh credentials, so policy decides each again, with the retry's
        // own risk signal: a set reloaded since, or a risen signal, applies to it.
        let mut events = Vec::new();
        for record in records.iter().filter(|record| is_live(record, now)) {
            let checked = self
                .catalog_check(caller, &task.id, "scopes", &record.scope)
                .and_then(|definition| {
                    let ask = GrantAsk {
                        field: "scopes",
                        task_id: &task.id,
                        purpose: &task.purpose,
                        context: &task.context,
                        ttl: None,
                        risk: request.risk,
                        now,
                    };
                    self.policy_check(caller, definition, &ask)
                        .and_then(|answer| {
                            answer.allowed_now(
                                "scopes",
                                &record.scope,
                                "a retry cannot wait for approval: ask with RequestGrant",
                            )
                        })
                });
            match checked {
                Ok(event) => events.push(event),
                Err(refused) => {
                    events.push(refused.event);
                    return self.refuse(&record.scope, refused.error, events).await;
                }
            }
        }
        let key = self.keyring.current();
        let mut leases: Vec<IssuedLease> = records
            .into_iter()
            .map(|record| {
                let credential = is_live(&record, now)
                    .then(|| self.fresh_credential(caller, &record, &key))
                    .flatten();
                IssuedLease { record, credential }
            })
            .collect();
        events.extend(
            leases
                .iter()
                .filter(|lease| lease.credential.is_some())
                .map(|lease| self.issuance_event(caller, "lease.reissued", lease)),
        );
        self.store.record_events(events).await?;
        // An API key the first call handed out is not shown again; one an approval issued
        // since, and not yet delivered, is handed out now.
        self.hand_out_keys(caller, &mut leases).await?;
        // The requests the first call made to wait, as they stand: still waiting ones only
        // (an approved one is among the leases).
        let waiting = PendingFilter {
            task: Some(task.id.as_str().to_owned()),
            ..PendingFilter::default()
        };
        let pending = self
            .store
            .pending_grant_requests(None, &waiting, MAX_PENDING_PER_WORKLOAD as usize, now)
            .await?
            .into_iter()
            .filter(|pending| request.scopes.contains(&pending.scope))
            .collect();
        Ok(OpenedTask {
            task,
            leases,
            pending,
            replayed: true,
        })
    }

    /// The audit event of a credential handed out to its owner `caller`: its HMAC, never the
    /// credential.
    fn issuance_event(
        &self,
        caller: &Caller,
        event_type: &'static str,
        lease: &IssuedLease,
    ) -> AuditEvent {
        let record = &lease.record;
        let mut event = AuditEvent::new(event_type, "ok", caller.name.as_str())
            .workload(&caller.name)
            .task(&record.task_id)
            .lease(&record.id)
            .scope(&record.scope)
            .with("kind", record.kind.as_str())
            .with("audience", record.audience.as_str())
            .with("expires_at", record.window.expires_at.0);
        if let Some(credential) = &lease.credential {
            event = event.with("credential_hmac", self.audit_key.hash(credential.expose()));
        }
        event
    }

    /// Checks `token` for `audience`: `Err` carries why it is inactive.
    async fn check_token(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<Result<AccessTokenClaims, Inactive>> {
        let now = UnixMillis::now();
        let Ok(decoded) = jwt::decode(token) else {
            return Ok(Err(Inactive::because("malformed")));
        };
        let Some(key) = self
            .keyring
            .find_verifying_key(self.store.as_ref(), decoded.kid(), now)
            .await?
        else {
            return Ok(Err(Inactive::because("unknown or unpublished key")));
        };
        let expected = Expectations {
            issuer: &self.settings.issuer,
            audience,
            now,
            leeway_seconds: 0,
        };
        let digest = VerifiedTokens::digest(token);
        let checked = if self.verified_tokens.contains(&digest) {
            jwt::check_verified(decoded, &key, expected)
        } else {
            let checked = jwt::check(token, decoded, &key, expected);
            if checked.is_ok() {
                self.verified_tokens.insert(digest);
            }
            checked
        };
        let claims = match checked {
            Ok(claims) => claims,
            Err(jwt::TokenError::WrongAudience(_)) => {
                return Ok(Err(Inactive::because("wrong audience")));
            }
            Err(jwt::TokenError::Expired) => return Ok(Err(Inactive::because("expired"))),
            Err(_) => return Ok(Err(Inactive::because("invalid signature or claims"))),
        };
        let (Ok(lease_id), Ok(task_id)) = (
            LeaseId::parse("jti", &claims.jti),
            TaskId::parse("task_id", &claims.task_id),
        ) else {
            return Ok(Err(Inactive::because("jti or task_id is not an id")));
        };
        if !self.store.is_lease_live(&lease_id, &task_id, now).await? {
            // A genuine token whose lease has ended: its claims are verified, so the use check
            // can join its task's story.
            return Ok(Err(Inactive::of(
                claims,
                "lease revoked, expired or unknown",
            )));
        }
        Ok(Ok(claims))
    }

    /// The credential an answer carrying the stored `lease` hands its owner `caller`: a JWT
    /// signed now; `None` for an API key, which is handed out once (with its new lease, or by
    /// [`Self::hand_out_keys`]).
    fn fresh_credential(
        &self,
        caller: &Caller,
        lease: &LeaseRecord,
        key: &SigningKey,
    ) -> Option<Credential> {
        match lease.kind {
            CredentialKind::Jwt => Some(self.mint(caller, lease, key, None)),
            CredentialKind::ApiKey => None,
        }
    }

    /// A new issued lease of `task` for `scope` (not yet stored) with its credential: a JWT,
    /// or an API key whose hash the lease carries.
    fn issue(
        &self,
        caller: &Caller,
        task: &TaskRecord,
        scope: &ScopeDefinition,
        ttl: Option<Duration>,
        now: UnixMillis,
        key: &SigningKey,
    ) -> IssuedLease {
        let mut record = issued_lease_record(LeaseId::generate(now), task, scope, ttl, now, key);
        let credential = match record.kind {
            CredentialKind::Jwt => self.mint(caller, &record, key, None),
            // Stored with the lease, so the key is handed out in the same transaction.
            CredentialKind::ApiKey => {
                let (api_key, secret_sha256) = crate::issuer::api_key::generate(&record.id);
                record.secret_sha256 = Some(secret_sha256);
                Credential(api_key)
            }
        };
        IssuedLease {
            record,
            credential: Some(credential),
        }
    }

    /// Signs the access token of `lease` for its owner `caller`; a call token carries the
    /// tool and arguments digest it is bound to.
    fn mint(
        &self,
        caller: &Caller,
        lease: &LeaseRecord,
        key: &SigningKey,
        call: Option<&CallBinding>,
    ) -> Credential {
        let claims = AccessTokenClaims {
            cnf: caller
                .certificate_thumbprint
                .as_ref()
                .map(|thumbprint| jwt::Confirmation {
                    x5t_s256: thumbprint.clone(),
                }),
            tool: call.map(|call| call.tool.clone()),
            arguments_digest: call.map(|call| call.arguments_digest.clone()),
            ..self.lease_claims(lease, caller.spiffe_id.as_str(), caller.name.as_str())
        };
        Credential(jwt::sign(key, &claims))
    }

    /// What a credential of `lease` held by workload `name` (SPIFFE ID `sub`) says: the claims
    /// every kind shares, with no certificate binding and no tool call.
    fn lease_claims(&self, lease: &LeaseRecord, sub: &str, name: &str) -> AccessTokenClaims {
        AccessTokenClaims {
            iss: self.settings.issuer.clone(),
            sub: sub.to_owned(),
            aud: lease.audience.clone(),
            exp: lease.window.expires_at.as_seconds(),
            iat: lease.window.issued_at.as_seconds(),
            nbf: lease.window.issued_at.as_seconds(),
            jti: lease.id.as_str().to_owned(),
            scope: lease.scope.as_str().to_owned(),
            client_id: name.to_owned(),
            task_id: lease.task_id.as_str().to_owned(),
            cnf: None,
            tool: None,
            arguments_digest: None,
            max_uses: self
                .catalog
                .lease_definition(&lease.scope)
                .and_then(|definition| definition.max_uses),
        }
    }
}

fn ensure_task_active(task: &TaskRecord, now: UnixMillis) -> Result<()> {
    if task.state == TaskState::Active && task.deadline > now {
        Ok(())
    } else {
        Err(task_not_active(&task.id))
    }
}

/// The audience of an introspection: given, bounded (it goes into the use record), and, for
/// a resource server, one it serves; admins may ask about any audience.
fn check_introspection_audience(caller: &Caller, audience: &str) -> Result<()> {
    if audience.is_empty() {
        return Err(Error::invalid(
            "audience",
            "is required: the audience your API serves",
        ));
    }
    if audience.len() > MAX_AUDIENCE_BYTES {
        return Err(Error::invalid(
            "audience",
            format!("is longer than {MAX_AUDIENCE_BYTES} bytes"),
        ));
    }
    if !caller.roles.contains(&Role::Admin) && !caller.serves(audience) {
        return Err(Error::PermissionDenied(format!(
            "audience: workload '{}' does not serve this audience; a resource server may \
             introspect only tokens of the audiences it was registered with",
            caller.name
        )));
    }
    Ok(())
}

fn no_such_workload(name: &WorkloadName) -> Error {
    Error::NotFound {
        kind: "workload",
        id: name.to_string(),
    }
}

/// Why renewing at `now` for `ttl` would not make the lease end any later. A renewal runs from
/// now, so right after issuance the scope's default TTL does not extend the lease.
fn not_extended(lease_id: &LeaseId, window: LeaseWindow, now: UnixMillis, ttl: Duration) -> Error {
    if window.expires_at >= window.renewable_until {
        return Error::FailedPrecondition(format!(
            "lease_id: lease {lease_id} cannot be extended: it already expires at its limit, {} \
             (its scope's max_ttl from first issuance, or its task's deadline)",
            window.expires_at
        ));
    }
    Error::FailedPrecondition(format!(
        "ttl_seconds: a renewal runs from now, so {}s would end at {}, not after the lease's \
         current expiry {}; ask for a longer TTL (it can run until {})",
        ttl.as_secs(),
        now.floor_to_second().plus(ttl),
        window.expires_at,
        window.renewable_until
    ))
}

fn task_not_active(task_id: &TaskId) -> Error {
    Error::FailedPrecondition(format!(
        "task_id: task {task_id} is no longer active (completed, revoked or expired)"
    ))
}
