//! Tasks and leases on SQLite: issuance, renewal, completion, revocation and expiry.
//!
//! Every write runs on the one writer connection, so writes are serial: a renewal and a
//! completion, or a renewal and the reaper, never interleave, and each statement sees everything
//! committed or written before it in the batch.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::writer::Write;
use super::{audit, feed};
use crate::audit::AuditEvent;
use crate::domain::{LeaseId, LeaseState, RevocationReason, ScopeName, TaskId, UnixMillis};
use crate::error::Result;
use crate::store::records::{
    ApiKeyRecord, EndedLease, ExpiryReport, FeedEvent, LeaseColumns, LeaseRecord, NewLeaseOutcome,
    Renewal, RenewalOutcome, TaskColumns, TaskInsertion, TaskRecord, ended_leases, task_ended,
};

const TASK_COLUMNS: &str = "id, workload_id, purpose, context_json, state, created_at, deadline, \
     ended_at, idempotency_key, request_digest";
const LEASE_COLUMNS: &str = "id, task_id, scope, kind, audience, state, kid, issued_at, expires_at, \
     renewable_until, ended_at, secret_sha256";

pub fn find_task(
    connection: &Connection,
    id: &TaskId,
    workload_id: &str,
) -> Result<Option<TaskRecord>> {
    connection
        .prepare_cached(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1 AND workload_id = ?2"
        ))?
        .query_row(params![id.as_str(), workload_id], task_columns)
        .optional()?
        .map(TaskColumns::into_record)
        .transpose()
}

pub fn find_task_by_idempotency_key(
    connection: &Connection,
    workload_id: &str,
    key: &str,
) -> Result<Option<TaskRecord>> {
    connection
        .prepare_cached(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE workload_id = ?1 AND idempotency_key = ?2"
        ))?
        .query_row(params![workload_id, key], task_columns)
        .optional()?
        .map(TaskColumns::into_record)
        .transpose()
}

pub fn leases_of_task(connection: &Connection, id: &TaskId) -> Result<Vec<LeaseRecord>> {
    connection
        .prepare_cached(&format!(
            "SELECT {LEASE_COLUMNS} FROM leases WHERE task_id = ?1 ORDER BY id"
        ))?
        .query_map([id.as_str()], lease_columns)?
        .map(|columns| columns?.into_record())
        .collect()
}

pub fn set_api_key(
    write: &mut Write<'_>,
    id: &LeaseId,
    secret_sha256: &[u8],
    events: &[AuditEvent],
) -> Result<bool> {
    let recorded = write.connection.execute(
        "UPDATE leases SET secret_sha256 = ?1 \
         WHERE id = ?2 AND secret_sha256 IS NULL AND state = 'issued'",
        params![secret_sha256, id.as_str()],
    )? == 1;
    if recorded {
        audit::insert_events(write, events)?;
    }
    Ok(recorded)
}

pub fn find_api_key(connection: &Connection, id: &LeaseId) -> Result<Option<ApiKeyRecord>> {
    connection
        .prepare_cached(
            "SELECT l.id, l.task_id, l.scope, l.kind, l.audience, l.state, l.kid, l.issued_at, \
             l.expires_at, l.renewable_until, l.ended_at, l.secret_sha256, w.name, w.spiffe_id \
             FROM leases l JOIN tasks t ON t.id = l.task_id JOIN workloads w ON w.id = t.workload_id \
             WHERE l.id = ?1 AND l.secret_sha256 IS NOT NULL",
        )?
        .query_row([id.as_str()], |row| {
            Ok((
                lease_columns(row)?,
                row.get::<_, String>(12)?,
                row.get::<_, String>(13)?,
            ))
        })
        .optional()?
        .map(|(columns, workload_name, spiffe_id)| {
            Ok(ApiKeyRecord {
                lease: columns.into_record()?,
                workload_name,
                spiffe_id,
            })
        })
        .transpose()
}

pub fn issued_leases_of_scope(
    connection: &Connection,
    scope: &ScopeName,
    limit: usize,
) -> Result<Vec<LeaseId>> {
    connection
        .prepare_cached(
            "SELECT id FROM leases WHERE scope = ?1 AND state = 'issued' ORDER BY id LIMIT ?2",
        )?
        .query_map(params![scope.as_str(), limit as i64], |row| row.get(0))?
        .map(|id| Ok(LeaseId::from_stored(id?)))
        .collect()
}

pub fn find_lease(
    connection: &Connection,
    id: &LeaseId,
    workload_id: &str,
) -> Result<Option<LeaseRecord>> {
    connection
        .prepare_cached(
            "SELECT l.id, l.task_id, l.scope, l.kind, l.audience, l.state, l.kid, l.issued_at, \
             l.expires_at, l.renewable_until, l.ended_at, l.secret_sha256 \
             FROM leases l JOIN tasks t ON t.id = l.task_id \
             WHERE l.id = ?1 AND t.workload_id = ?2",
        )?
        .query_row(params![id.as_str(), workload_id], lease_columns)
        .optional()?
        .map(LeaseColumns::into_record)
        .transpose()
}

/// Stores a task, its first leases and `events`, unless its workload's identity is revoked or
/// the workload already used the task's idempotency key. The one writer makes the identity
/// check and the insert atomic with respect to the kill switch.
pub fn insert_task(
    write: &mut Write<'_>,
    task: &TaskRecord,
    leases: &[LeaseRecord],
    events: &[AuditEvent],
) -> Result<TaskInsertion> {
    let is_live = write
        .connection
        .prepare_cached("SELECT 1 FROM workloads WHERE id = ?1 AND revoked_at IS NULL")?
        .query_row(params![task.workload_id], |_| Ok(()))
        .optional()?
        .is_some();
    if !is_live {
        return Ok(TaskInsertion::IdentityRevoked);
    }
    let context_json =
        serde_json::to_string(&task.context).map_err(crate::error::Error::internal)?;
    let inserted = write
        .connection
        .prepare_cached(&format!(
            "INSERT INTO tasks ({TASK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
             ON CONFLICT (workload_id, idempotency_key) DO NOTHING"
        ))?
        .execute(params![
            task.id.as_str(),
            task.workload_id,
            task.purpose,
            context_json,
            task.state.as_str(),
            task.created_at.0,
            task.deadline.0,
            task.ended_at.map(|at| at.0),
            task.idempotency_key,
            task.request_digest,
        ])?;
    if inserted == 0 {
        return Ok(TaskInsertion::KeyTaken);
    }
    insert_leases(write.connection, leases)?;
    audit::insert_events(write, events)?;
    Ok(TaskInsertion::Inserted)
}

/// Adds `lease` to its task if `workload_id` owns it and it is active at `now`.
pub fn add_lease(
    write: &mut Write<'_>,
    workload_id: &str,
    lease: &LeaseRecord,
    now: UnixMillis,
    events: &[AuditEvent],
) -> Result<NewLeaseOutcome> {
    if !is_task_open(write.connection, &lease.task_id, workload_id, now)? {
        return Ok(NewLeaseOutcome::TaskNotActive);
    }
    insert_leases(write.connection, std::slice::from_ref(lease))?;
    audit::insert_events(write, events)?;
    Ok(NewLeaseOutcome::Added)
}

/// Whether `workload_id`'s task `id` is active and before its deadline at `now`.
pub fn is_task_open(
    connection: &Connection,
    id: &TaskId,
    workload_id: &str,
    now: UnixMillis,
) -> Result<bool> {
    Ok(connection
        .prepare_cached(
            "SELECT 1 FROM tasks WHERE id = ?1 AND workload_id = ?2 AND state = 'active' AND deadline > ?3",
        )?
        .query_row(params![id.as_str(), workload_id, now.0], |_| Ok(()))
        .optional()?
        .is_some())
}

pub fn insert_leases(connection: &Connection, leases: &[LeaseRecord]) -> Result<()> {
    let mut insert = connection.prepare_cached(&format!(
        "INSERT INTO leases ({LEASE_COLUMNS}) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    ))?;
    for lease in leases {
        insert.execute(params![
            lease.id.as_str(),
            lease.task_id.as_str(),
            lease.scope.as_str(),
            lease.kind.as_str(),
            lease.audience,
            lease.state.as_str(),
            lease.kid,
            lease.window.issued_at.0,
            lease.window.expires_at.0,
            lease.window.renewable_until.0,
            lease.ended_at.map(|at| at.0),
            lease.secret_sha256,
        ])?;
    }
    Ok(())
}

/// Moves an issued, unexpired lease of an active task to its renewed window.
pub fn renew(
    write: &mut Write<'_>,
    renewal: &Renewal,
    events: &[AuditEvent],
) -> Result<RenewalOutcome> {
    let renewed = write
        .connection
        .prepare_cached(
            "UPDATE leases SET issued_at = ?1, expires_at = ?2, kid = ?3 \
             WHERE id = ?4 AND task_id = ?5 AND state = 'issued' AND expires_at > ?6 \
             AND EXISTS (SELECT 1 FROM tasks WHERE id = ?5 AND state = 'active')",
        )?
        .execute(params![
            renewal.window.issued_at.0,
            renewal.window.expires_at.0,
            renewal.kid,
            renewal.lease_id.as_str(),
            renewal.task_id.as_str(),
            renewal.now.0,
        ])?;
    if renewed == 0 {
        return Ok(RenewalOutcome::NotRenewable);
    }
    audit::insert_events(write, events)?;
    Ok(RenewalOutcome::Renewed)
}

/// Completes an active task of `workload_id`, revoking its issued leases; `None` when the task
/// was not active (or not the workload's).
pub fn complete(
    write: &mut Write<'_>,
    id: &TaskId,
    workload_id: &str,
    now: UnixMillis,
    actor: &str,
) -> Result<Option<Vec<EndedLease>>> {
    let completed = write
        .connection
        .prepare_cached(
            "UPDATE tasks SET state = 'completed', ended_at = ?1 \
             WHERE id = ?2 AND workload_id = ?3 AND state = 'active'",
        )?
        .execute(params![now.0, id.as_str(), workload_id])?;
    if completed == 0 {
        return Ok(None);
    }
    let events = end_task(write, id.as_str(), RevocationReason::TaskCompleted, now)?;
    let ended = ended_leases(&events);
    feed::append(write, events, actor)?;
    Ok(Some(ended))
}

/// Revokes an active task (any workload's) and its leases.
pub fn revoke_task(
    write: &mut Write<'_>,
    id: &TaskId,
    now: UnixMillis,
    actor: &str,
    events: &[AuditEvent],
) -> Result<Option<Vec<EndedLease>>> {
    let revoked = write
        .connection
        .prepare_cached(
            "UPDATE tasks SET state = 'revoked', ended_at = ?1 WHERE id = ?2 AND state = 'active'",
        )?
        .execute(params![now.0, id.as_str()])?;
    if revoked == 0 {
        return Ok(None);
    }
    let ended = end_task(write, id.as_str(), RevocationReason::Revoked, now)?;
    let leases = ended_leases(&ended);
    feed::append(write, ended, actor)?;
    audit::insert_events(write, events)?;
    Ok(Some(leases))
}

/// Revokes one issued lease (any workload's).
pub fn revoke_lease(
    write: &mut Write<'_>,
    id: &LeaseId,
    now: UnixMillis,
    actor: &str,
    events: &[AuditEvent],
) -> Result<Option<EndedLease>> {
    let ended = end_leases(
        write.connection,
        "UPDATE leases SET state = ?1, ended_at = ?2 WHERE state = 'issued' AND id = ?3 \
         RETURNING id, task_id, scope, audience, expires_at",
        params![LeaseState::Revoked.as_str(), now.0, id.as_str()],
        RevocationReason::Revoked,
        now,
    )?;
    let Some(lease) = ended_leases(&ended).pop() else {
        return Ok(None);
    };
    feed::append(write, ended, actor)?;
    audit::insert_events(write, events)?;
    Ok(Some(lease))
}

/// Expires up to `batch` leases and `batch` tasks whose time has passed at `now`.
pub fn expire_due(
    write: &mut Write<'_>,
    now: UnixMillis,
    batch: usize,
    actor: &str,
) -> Result<ExpiryReport> {
    let batch = i64::try_from(batch).unwrap_or(i64::MAX);
    let mut events = end_leases(
        write.connection,
        "UPDATE leases SET state = ?1, ended_at = ?2 WHERE state = 'issued' AND id IN \
         (SELECT id FROM leases WHERE state = 'issued' AND expires_at <= ?2 ORDER BY expires_at LIMIT ?3) \
         RETURNING id, task_id, scope, audience, expires_at",
        params![LeaseState::Expired.as_str(), now.0, batch],
        RevocationReason::LeaseExpired,
        now,
    )?;
    let tasks: Vec<String> = write
        .connection
        .prepare_cached(
            "UPDATE tasks SET state = 'expired', ended_at = ?1 WHERE state = 'active' AND id IN \
             (SELECT id FROM tasks WHERE state = 'active' AND deadline <= ?1 ORDER BY deadline LIMIT ?2) \
             RETURNING id",
        )?
        .query_map(params![now.0, batch], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    for task in &tasks {
        events.extend(end_task(write, task, RevocationReason::TaskExpired, now)?);
    }
    let report = ExpiryReport {
        leases: ended_leases(&events),
        tasks: tasks.len(),
    };
    feed::append(write, events, actor)?;
    Ok(report)
}

/// Ends the issued leases of a task that has just ended: one feed event per lease, then one for
/// the task, valid until the latest of those leases' expiries.
fn end_task(
    write: &mut Write<'_>,
    task_id: &str,
    reason: RevocationReason,
    now: UnixMillis,
) -> Result<Vec<FeedEvent>> {
    super::grants::cancel_for_task(write, task_id, now)?;
    let new_state = if reason == RevocationReason::TaskExpired {
        LeaseState::Expired
    } else {
        LeaseState::Revoked
    };
    let mut events = end_leases(
        write.connection,
        "UPDATE leases SET state = ?1, ended_at = ?2 WHERE state = 'issued' AND task_id = ?3 \
         RETURNING id, task_id, scope, audience, expires_at",
        params![new_state.as_str(), now.0, task_id],
        reason,
        now,
    )?;
    events.push(task_ended(task_id, reason, &events, now));
    Ok(events)
}

/// Runs a lease-ending `UPDATE ... RETURNING id, task_id, scope, audience, expires_at`: one feed
/// event per lease it ended.
fn end_leases(
    connection: &Connection,
    sql: &str,
    parameters: impl rusqlite::Params,
    reason: RevocationReason,
    now: UnixMillis,
) -> Result<Vec<FeedEvent>> {
    Ok(connection
        .prepare_cached(sql)?
        .query_map(parameters, |row| {
            Ok(FeedEvent {
                lease_id: Some(row.get(0)?),
                task_id: row.get(1)?,
                scope: Some(row.get(2)?),
                audience: Some(row.get(3)?),
                reason,
                not_after: UnixMillis(row.get(4)?),
                occurred_at: now,
            })
        })?
        .collect::<Result<_, _>>()?)
}

fn task_columns(row: &Row<'_>) -> rusqlite::Result<TaskColumns> {
    Ok(TaskColumns {
        id: row.get(0)?,
        workload_id: row.get(1)?,
        purpose: row.get(2)?,
        context_json: row.get(3)?,
        state: row.get(4)?,
        created_at: row.get(5)?,
        deadline: row.get(6)?,
        ended_at: row.get(7)?,
        idempotency_key: row.get(8)?,
        request_digest: row.get(9)?,
    })
}

fn lease_columns(row: &Row<'_>) -> rusqlite::Result<LeaseColumns> {
    Ok(LeaseColumns {
        id: row.get(0)?,
        task_id: row.get(1)?,
        scope: row.get(2)?,
        kind: row.get(3)?,
        audience: row.get(4)?,
        state: row.get(5)?,
        kid: row.get(6)?,
        issued_at: row.get(7)?,
        expires_at: row.get(8)?,
        renewable_until: row.get(9)?,
        ended_at: row.get(10)?,
        secret_sha256: row.get(11)?,
    })
}
