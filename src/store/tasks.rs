//! Tasks and leases: issuance, renewal, completion, revocation and expiry, each one transaction.
//!
//! Every change that ends leases appends its feed events in the same transaction, so the feed
//! never misses a revocation and never reports one that did not commit. Statements that add to
//! or extend a task first touch the task's (or lease's) row with a guarded `UPDATE`: on
//! PostgreSQL that row lock orders them against a concurrent completion, so no lease can be added
//! to a task whose completion has already swept its leases.

use sqlx::Row;

use super::batch::{Outcome, Write, unexpected};
use super::feed::{self, FeedEvent};
use super::records::{LEASE_COLUMNS, LeaseRecord, TASK_COLUMNS, TaskRecord};
use super::{Store, audit};
use crate::audit::{AuditEvent, REAPER};
use crate::domain::task::LeaseWindow;
use crate::domain::{LeaseId, LeaseState, RevocationReason, TaskId, TaskState, UnixMillis};
use crate::error::{Error, Result};

/// What [`Store::add_lease`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum NewLeaseOutcome {
    Added,
    /// The task is not active (completed, expired, revoked, or past its deadline).
    TaskNotActive,
}

/// What [`Store::renew_lease`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum RenewalOutcome {
    Renewed,
    /// The lease is no longer issued or has already expired.
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
pub(super) fn ended_leases(events: &[FeedEvent]) -> Vec<EndedLease> {
    events
        .iter()
        .filter_map(|event| {
            let id = LeaseId::from_stored(event.lease_id.clone()?);
            Some(EndedLease {
                id,
                scope: event.scope.clone().unwrap_or_default(),
                not_after: event.not_after,
            })
        })
        .collect()
}

/// What [`Store::complete_task`] did.
#[derive(Debug)]
pub enum CompletionOutcome {
    Completed {
        revoked: Vec<EndedLease>,
        ended_at: UnixMillis,
        feed_seq: i64,
    },
    AlreadyEnded(TaskRecord),
    NotFound,
}

/// Leases and tasks the reaper ended in one pass.
#[derive(Debug, Default)]
pub struct ExpiryReport {
    pub leases: Vec<EndedLease>,
    pub tasks: usize,
    /// The feed position after the pass, when it appended events.
    pub feed_seq: Option<i64>,
}

impl Store {
    /// The task `workload_id` opened with `idempotency_key`, if any.
    pub async fn find_task_by_idempotency_key(
        &self,
        workload_id: &str,
        key: &str,
    ) -> Result<Option<TaskRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks t WHERE t.workload_id = $1 AND t.idempotency_key = $2"
        ))
        .bind(workload_id)
        .bind(key)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(TaskRecord::from_row).transpose()
    }

    /// The task `id` if `workload_id` owns it.
    pub async fn find_task(&self, id: &TaskId, workload_id: &str) -> Result<Option<TaskRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks t WHERE t.id = $1 AND t.workload_id = $2"
        ))
        .bind(id.as_str())
        .bind(workload_id)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(TaskRecord::from_row).transpose()
    }

    /// Every lease of a task, oldest first.
    pub async fn leases_of_task(&self, id: &TaskId) -> Result<Vec<LeaseRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {LEASE_COLUMNS} FROM leases l WHERE l.task_id = $1 ORDER BY l.id"
        ))
        .bind(id.as_str())
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(LeaseRecord::from_row).collect()
    }

    /// Stores a new task with its first leases in one (shared) transaction. Returns `false`,
    /// storing nothing, when the workload already used the task's idempotency key.
    pub async fn insert_task(
        &self,
        task: &TaskRecord,
        leases: &[LeaseRecord],
        events: &[AuditEvent],
    ) -> Result<bool> {
        let write = Write::NewTask {
            context_json: serde_json::to_string(&task.context).map_err(Error::internal)?,
            task: task.clone(),
            leases: leases.to_vec(),
            events: events.to_vec(),
        };
        match self.committer.submit(write).await? {
            Outcome::TaskInserted(inserted) => Ok(inserted),
            other => Err(unexpected(other)),
        }
    }

    /// Adds `lease` to its task, owned by `workload_id`, if the task is active at `now`.
    pub async fn add_lease(
        &self,
        workload_id: &str,
        lease: &LeaseRecord,
        now: UnixMillis,
        events: &[AuditEvent],
    ) -> Result<NewLeaseOutcome> {
        let write = Write::AddLease {
            workload_id: workload_id.to_owned(),
            lease: lease.clone(),
            now,
            events: events.to_vec(),
        };
        match self.committer.submit(write).await? {
            Outcome::LeaseAdded(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    /// The lease `id` if it belongs to a task of `workload_id`.
    pub async fn find_lease(&self, id: &LeaseId, workload_id: &str) -> Result<Option<LeaseRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {LEASE_COLUMNS} FROM leases l JOIN tasks t ON t.id = l.task_id WHERE l.id = $1 AND t.workload_id = $2"
        ))
        .bind(id.as_str())
        .bind(workload_id)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(LeaseRecord::from_row).transpose()
    }

    /// Moves an issued, unexpired lease to `window`, signed now by `kid`.
    pub async fn renew_lease(
        &self,
        id: &LeaseId,
        window: LeaseWindow,
        kid: &str,
        now: UnixMillis,
        events: &[AuditEvent],
    ) -> Result<RenewalOutcome> {
        let write = Write::Renew {
            id: id.clone(),
            window,
            kid: kid.to_owned(),
            now,
            events: events.to_vec(),
        };
        match self.committer.submit(write).await? {
            Outcome::Renewed(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    /// Completes an active task of `workload_id` and revokes all its issued leases; `actor` is
    /// recorded as the cause.
    pub async fn complete_task(
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
            Some((revoked, feed_seq)) => CompletionOutcome::Completed {
                revoked,
                ended_at: now,
                feed_seq,
            },
            None => match self.find_task(id, workload_id).await? {
                Some(task) => CompletionOutcome::AlreadyEnded(task),
                None => CompletionOutcome::NotFound,
            },
        })
    }

    /// Revokes an active task (any workload's) and its leases. `None` when no such active task.
    pub async fn revoke_task(
        &self,
        id: &TaskId,
        now: UnixMillis,
        actor: &str,
        events: &[AuditEvent],
    ) -> Result<Option<(Vec<EndedLease>, i64)>> {
        let mut tx = self.writer.begin().await?;
        let ended = sqlx::query(
            "UPDATE tasks SET state = 'revoked', ended_at = $1 WHERE id = $2 AND state = 'active' RETURNING deadline",
        )
        .bind(now.0)
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(ended) = ended else { return Ok(None) };
        let deadline = UnixMillis(ended.try_get("deadline")?);
        let ended = end_task(
            &mut tx,
            id.as_str(),
            deadline,
            LeaseState::Revoked,
            RevocationReason::Revoked,
            now,
        )
        .await?;
        let feed_seq = feed::append(&mut tx, &feed::caused_by(&ended, actor)).await?;
        audit::insert_events(&mut tx, events).await?;
        tx.commit().await?;
        Ok(Some((ended_leases(&ended), feed_seq)))
    }

    /// Revokes one issued lease (any workload's). `None` when no such issued lease.
    pub async fn revoke_lease(
        &self,
        id: &LeaseId,
        now: UnixMillis,
        actor: &str,
        audit_events: &[AuditEvent],
    ) -> Result<Option<(EndedLease, i64)>> {
        let mut tx = self.writer.begin().await?;
        let events = end_leases(
            &mut tx,
            LeaseSelection::One(id.as_str()),
            LeaseState::Revoked,
            RevocationReason::Revoked,
            now,
        )
        .await?;
        if events.is_empty() {
            return Ok(None);
        }
        let feed_seq = feed::append(&mut tx, &feed::caused_by(&events, actor)).await?;
        audit::insert_events(&mut tx, audit_events).await?;
        tx.commit().await?;
        let ended = ended_leases(&events)
            .pop()
            .ok_or_else(|| Error::internal("revoked lease without event"))?;
        Ok(Some((ended, feed_seq)))
    }

    /// Whether lease `id` is issued, unexpired at `now`, and its task still active: the
    /// broker-side half of introspection.
    pub async fn lease_is_live(&self, id: &LeaseId, now: UnixMillis) -> Result<bool> {
        let row = sqlx::query(
            "SELECT l.state, l.expires_at, t.state AS task_state FROM leases l JOIN tasks t ON t.id = l.task_id \
             WHERE l.id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.reader)
        .await?;
        let Some(row) = row else { return Ok(false) };
        let lease_state: String = row.try_get("state")?;
        let task_state: String = row.try_get("task_state")?;
        let expires_at: i64 = row.try_get("expires_at")?;
        Ok(lease_state == LeaseState::Issued.as_str()
            && task_state == TaskState::Active.as_str()
            && expires_at > now.0)
    }

    /// Marks up to `batch` leases and `batch` tasks whose time has passed at `now` as expired,
    /// recording each on the feed.
    pub async fn expire_due(&self, now: UnixMillis, batch: i64) -> Result<ExpiryReport> {
        let mut tx = self.writer.begin().await?;
        let mut events = end_leases(
            &mut tx,
            LeaseSelection::Due(now, batch),
            LeaseState::Expired,
            RevocationReason::LeaseExpired,
            now,
        )
        .await?;
        let mut report = ExpiryReport::default();
        let tasks = sqlx::query(
            "UPDATE tasks SET state = 'expired', ended_at = $1 WHERE state = 'active' AND id IN \
             (SELECT id FROM tasks WHERE state = 'active' AND deadline <= $1 ORDER BY deadline LIMIT $2) \
             RETURNING id, deadline",
        )
        .bind(now.0)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        report.tasks = tasks.len();
        for task in &tasks {
            let task_id: String = task.try_get("id")?;
            let ended = end_task(
                &mut tx,
                &task_id,
                UnixMillis(task.try_get("deadline")?),
                LeaseState::Expired,
                RevocationReason::TaskExpired,
                now,
            )
            .await?;
            events.extend(ended);
        }
        report.leases = ended_leases(&events);
        if !events.is_empty() {
            report.feed_seq = Some(feed::append(&mut tx, &feed::caused_by(&events, REAPER)).await?);
        }
        tx.commit().await?;
        Ok(report)
    }
}

/// Ends the issued leases of a task that has just ended (with `deadline`): the feed events to
/// append, one per lease and then one for the task.
pub(super) async fn end_task(
    connection: &mut sqlx::AnyConnection,
    task_id: &str,
    deadline: UnixMillis,
    new_state: LeaseState,
    reason: RevocationReason,
    now: UnixMillis,
) -> Result<Vec<FeedEvent>> {
    let mut events = end_leases(
        connection,
        LeaseSelection::OfTask(task_id),
        new_state,
        reason,
        now,
    )
    .await?;
    events.push(task_event(task_id.to_owned(), reason, deadline, now));
    Ok(events)
}

/// Which issued leases [`end_leases`] ends.
enum LeaseSelection<'a> {
    One(&'a str),
    OfTask(&'a str),
    /// Up to `batch` leases whose expiry is at or before the instant, earliest first.
    Due(UnixMillis, i64),
}

/// Moves the issued leases in `selection` to `new_state`, returning one feed event per lease.
async fn end_leases(
    connection: &mut sqlx::AnyConnection,
    selection: LeaseSelection<'_>,
    new_state: LeaseState,
    reason: RevocationReason,
    now: UnixMillis,
) -> Result<Vec<FeedEvent>> {
    let filter = match selection {
        LeaseSelection::One(_) => "id = $3",
        LeaseSelection::OfTask(_) => "task_id = $3",
        LeaseSelection::Due(..) => {
            "id IN (SELECT id FROM leases WHERE state = 'issued' AND expires_at <= $3 ORDER BY expires_at LIMIT $4)"
        }
    };
    let sql = format!(
        "UPDATE leases SET state = $1, ended_at = $2 WHERE state = 'issued' AND {filter} \
         RETURNING id, task_id, scope, audience, expires_at"
    );
    let query = sqlx::query(&sql).bind(new_state.as_str()).bind(now.0);
    let query = match selection {
        LeaseSelection::One(id) | LeaseSelection::OfTask(id) => query.bind(id),
        LeaseSelection::Due(at, batch) => query.bind(at.0).bind(batch),
    };
    let rows = query.fetch_all(&mut *connection).await?;
    rows.iter()
        .map(|row| {
            Ok(FeedEvent {
                lease_id: Some(row.try_get("id")?),
                task_id: row.try_get("task_id")?,
                scope: Some(row.try_get("scope")?),
                audience: Some(row.try_get("audience")?),
                reason,
                not_after: UnixMillis(row.try_get("expires_at")?),
                occurred_at: now,
            })
        })
        .collect()
}

fn task_event(
    task_id: String,
    reason: RevocationReason,
    deadline: UnixMillis,
    now: UnixMillis,
) -> FeedEvent {
    FeedEvent {
        lease_id: None,
        task_id,
        scope: None,
        audience: None,
        reason,
        not_after: deadline,
        occurred_at: now,
    }
}
