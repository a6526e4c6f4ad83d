//! Tasks and leases on PostgreSQL: reads, and the writes outside group commit (admin
//! revocations and expiry), each one transaction that locks tasks before leases.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use super::batch::{end_leases_of_tasks, with_task_event};
use super::feed;
use crate::audit::AuditEvent;
use crate::domain::{
    LeaseId, LeaseState, RevocationReason, ScopeName, TaskId, TaskState, UnixMillis,
};
use crate::error::Result;
use crate::store::records::{
    ApiKeyRecord, FeedEvent, LeaseColumns, LeaseRecord, TaskColumns, TaskRecord,
};

/// The task columns reads select, in the order [`task_columns`] decodes them.
macro_rules! task_columns {
    () => {
        "t.id, t.workload_id, t.purpose, t.context_json, t.state, t.created_at, t.deadline, \
         t.ended_at, t.idempotency_key, t.request_digest"
    };
}

/// The lease columns reads select, in the order [`lease_columns`] decodes them.
macro_rules! lease_columns {
    () => {
        "l.id, l.task_id, l.scope, l.kind, l.audience, l.state, l.kid, l.issued_at, l.expires_at, \
         l.renewable_until, l.ended_at, l.secret_sha256"
    };
}

pub async fn find_task(
    pool: &PgPool,
    id: &TaskId,
    workload_id: &str,
) -> Result<Option<TaskRecord>> {
    sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks t WHERE t.id = $1 AND t.workload_id = $2"
    ))
    .bind(id.as_str())
    .bind(workload_id)
    .fetch_optional(pool)
    .await?
    .map(|row| task_columns(&row)?.into_record())
    .transpose()
}

pub async fn find_task_by_idempotency_key(
    pool: &PgPool,
    workload_id: &str,
    key: &str,
) -> Result<Option<TaskRecord>> {
    sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks t WHERE t.workload_id = $1 AND t.idempotency_key = $2"
    ))
    .bind(workload_id)
    .bind(key)
    .fetch_optional(pool)
    .await?
    .map(|row| task_columns(&row)?.into_record())
    .transpose()
}

pub async fn leases_of_task(pool: &PgPool, id: &TaskId) -> Result<Vec<LeaseRecord>> {
    sqlx::query(concat!(
        "SELECT ",
        lease_columns!(),
        " FROM leases l WHERE l.task_id = $1 ORDER BY l.id"
    ))
    .bind(id.as_str())
    .fetch_all(pool)
    .await?
    .iter()
    .map(|row| lease_columns(row)?.into_record())
    .collect()
}

pub async fn set_api_key(
    connection: &mut PgConnection,
    id: &LeaseId,
    secret_sha256: &[u8],
    events: &[AuditEvent],
) -> Result<bool> {
    let recorded = sqlx::query(
        "UPDATE leases SET secret_sha256 = $1 \
         WHERE id = $2 AND secret_sha256 IS NULL AND state = 'issued'",
    )
    .bind(secret_sha256)
    .bind(id.as_str())
    .execute(&mut *connection)
    .await?
    .rows_affected()
        == 1;
    if recorded {
        super::audit::insert_events(connection, &events.iter().collect::<Vec<_>>()).await?;
    }
    Ok(recorded)
}

pub async fn find_api_key(pool: &PgPool, id: &LeaseId) -> Result<Option<ApiKeyRecord>> {
    sqlx::query(concat!(
        "SELECT ",
        lease_columns!(),
        ", w.name, w.spiffe_id FROM leases l JOIN tasks t ON t.id = l.task_id \
         JOIN workloads w ON w.id = t.workload_id WHERE l.id = $1 AND l.secret_sha256 IS NOT NULL"
    ))
    .bind(id.as_str())
    .fetch_optional(pool)
    .await?
    .map(|row| {
        Ok(ApiKeyRecord {
            lease: lease_columns(&row)?.into_record()?,
            workload_name: row.try_get(12)?,
            spiffe_id: row.try_get(13)?,
        })
    })
    .transpose()
}

pub async fn issued_leases_of_scope(
    pool: &PgPool,
    scope: &ScopeName,
    limit: usize,
) -> Result<Vec<LeaseId>> {
    sqlx::query("SELECT id FROM leases WHERE scope = $1 AND state = 'issued' ORDER BY id LIMIT $2")
        .bind(scope.as_str())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await?
        .iter()
        .map(|row| Ok(LeaseId::from_stored(row.try_get(0)?)))
        .collect()
}

pub async fn find_lease(
    pool: &PgPool,
    id: &LeaseId,
    workload_id: &str,
) -> Result<Option<LeaseRecord>> {
    sqlx::query(concat!(
        "SELECT ",
        lease_columns!(),
        " FROM leases l JOIN tasks t ON t.id = l.task_id WHERE l.id = $1 AND t.workload_id = $2"
    ))
    .bind(id.as_str())
    .bind(workload_id)
    .fetch_optional(pool)
    .await?
    .map(|row| lease_columns(&row)?.into_record())
    .transpose()
}

/// Whether lease `id` is issued, unexpired at `now`, and its task still active, read from the
/// database (introspection's path while the in-memory state is not current).
pub async fn lease_is_live(pool: &PgPool, id: &LeaseId, now: UnixMillis) -> Result<bool> {
    let row = sqlx::query(
        "SELECT l.state, l.expires_at, t.state FROM leases l JOIN tasks t ON t.id = l.task_id WHERE l.id = $1",
    )
    .bind(id.as_str())
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(false) };
    let (lease_state, expires_at, task_state): (String, i64, String) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    Ok(lease_state == LeaseState::Issued.as_str()
        && task_state == TaskState::Active.as_str()
        && expires_at > now.0)
}

/// Revokes an active task and its leases, in the caller's transaction: the feed events, or
/// `None` when the task was not active.
pub async fn revoke_task(
    connection: &mut PgConnection,
    id: &TaskId,
    now: UnixMillis,
    actor: &str,
    events: &[AuditEvent],
) -> Result<Option<Vec<FeedEvent>>> {
    let revoked = sqlx::query(
        "UPDATE tasks SET state = 'revoked', ended_at = $1 WHERE id = $2 AND state = 'active' RETURNING id",
    )
    .bind(now.0)
    .bind(id.as_str())
    .fetch_optional(&mut *connection)
    .await?;
    if revoked.is_none() {
        return Ok(None);
    }
    let ended = end_tasks(connection, &[id.as_str()], now, RevocationReason::Revoked).await?;
    record(connection, &ended, actor, events).await?;
    Ok(Some(ended))
}

/// Revokes one issued lease, in the caller's transaction, after locking its task.
pub async fn revoke_lease(
    connection: &mut PgConnection,
    id: &LeaseId,
    now: UnixMillis,
    actor: &str,
    events: &[AuditEvent],
) -> Result<Option<FeedEvent>> {
    // Tasks before leases, as everywhere: a completion of the same task waits, or is waited for.
    sqlx::query(
        "SELECT 1 FROM tasks WHERE id = (SELECT task_id FROM leases WHERE id = $1) FOR UPDATE",
    )
    .bind(id.as_str())
    .fetch_optional(&mut *connection)
    .await?;
    let ended = sqlx::query(
        "UPDATE leases SET state = 'revoked', ended_at = $1 WHERE id = $2 AND state = 'issued' \
         RETURNING id, task_id, scope, audience, expires_at",
    )
    .bind(now.0)
    .bind(id.as_str())
    .fetch_optional(&mut *connection)
    .await?
    .map(|row| lease_event(&row, RevocationReason::Revoked, now))
    .transpose()?;
    let Some(ended) = ended else { return Ok(None) };
    record(connection, std::slice::from_ref(&ended), actor, events).await?;
    Ok(Some(ended))
}

/// Expires up to `batch` leases and `batch` tasks whose time has passed at `now`, in the
/// caller's transaction; each is re-checked under its row lock, so a renewal that committed
/// first keeps its lease. Rows another transaction holds right now (a renewal, a completion)
/// are skipped (`SKIP LOCKED`) and left for the next sweep, so the reaper never waits for, and
/// so never deadlocks with, anyone. Leases come first: a lease that ran out before its task is
/// reported as a lease expiry.
pub async fn expire_due(
    connection: &mut PgConnection,
    now: UnixMillis,
    batch: usize,
    actor: &str,
) -> Result<(Vec<FeedEvent>, usize)> {
    let batch = i64::try_from(batch).unwrap_or(i64::MAX);
    let mut ended = sqlx::query(
        "UPDATE leases l SET state = 'expired', ended_at = $1 WHERE l.id IN \
         (SELECT id FROM leases WHERE state = 'issued' AND expires_at <= $1 ORDER BY expires_at LIMIT $2 \
          FOR UPDATE SKIP LOCKED) \
         AND l.state = 'issued' AND l.expires_at <= $1 RETURNING l.id, l.task_id, l.scope, l.audience, l.expires_at",
    )
    .bind(now.0)
    .bind(batch)
    .fetch_all(&mut *connection)
    .await?
    .iter()
    .map(|row| lease_event(row, RevocationReason::LeaseExpired, now))
    .collect::<Result<Vec<_>>>()?;
    let expired_tasks: Vec<String> = sqlx::query(
        "WITH due AS (SELECT id FROM tasks WHERE state = 'active' AND deadline <= $1 \
         ORDER BY deadline LIMIT $2 FOR UPDATE SKIP LOCKED) \
         UPDATE tasks t SET state = 'expired', ended_at = $1 FROM due \
         WHERE t.id = due.id AND t.state = 'active' AND t.deadline <= $1 RETURNING t.id",
    )
    .bind(now.0)
    .bind(batch)
    .fetch_all(&mut *connection)
    .await?
    .iter()
    .map(|row| row.try_get(0))
    .collect::<Result<_, _>>()?;
    if !expired_tasks.is_empty() {
        let mut ids: Vec<&str> = expired_tasks.iter().map(String::as_str).collect();
        ids.sort_unstable();
        ended.extend(end_tasks(connection, &ids, now, RevocationReason::TaskExpired).await?);
    }
    record(connection, &ended, actor, &[]).await?;
    Ok((ended, expired_tasks.len()))
}

/// Ends the issued leases of the just-ended tasks `ids`: per task, its lease events and then
/// its own event.
async fn end_tasks(
    connection: &mut PgConnection,
    ids: &[&str],
    now: UnixMillis,
    reason: RevocationReason,
) -> Result<Vec<FeedEvent>> {
    let new_state = if reason == RevocationReason::TaskExpired {
        LeaseState::Expired
    } else {
        LeaseState::Revoked
    };
    let nows = vec![now.0; ids.len()];
    let mut by_task = end_leases_of_tasks(connection, ids, &nows, new_state, reason).await?;
    Ok(ids
        .iter()
        .flat_map(|id| with_task_event(by_task.remove(*id).unwrap_or_default(), id, reason, now))
        .collect())
}

/// Appends `ended` to the feed (with its audit events) and writes `events`.
async fn record(
    connection: &mut PgConnection,
    ended: &[FeedEvent],
    actor: &str,
    events: &[AuditEvent],
) -> Result<()> {
    let caused: Vec<(FeedEvent, &str)> = ended.iter().map(|event| (event.clone(), actor)).collect();
    feed::append(connection, &caused).await?;
    super::audit::insert_events(connection, &events.iter().collect::<Vec<_>>()).await
}

/// A feed event from `RETURNING id, task_id, scope, audience, expires_at`.
fn lease_event(row: &PgRow, reason: RevocationReason, now: UnixMillis) -> Result<FeedEvent> {
    Ok(FeedEvent {
        lease_id: Some(row.try_get(0)?),
        task_id: row.try_get(1)?,
        scope: Some(row.try_get(2)?),
        audience: Some(row.try_get(3)?),
        reason,
        not_after: UnixMillis(row.try_get(4)?),
        occurred_at: now,
    })
}

fn task_columns(row: &PgRow) -> Result<TaskColumns> {
    Ok(TaskColumns {
        id: row.try_get(0)?,
        workload_id: row.try_get(1)?,
        purpose: row.try_get(2)?,
        context_json: row.try_get(3)?,
        state: row.try_get(4)?,
        created_at: row.try_get(5)?,
        deadline: row.try_get(6)?,
        ended_at: row.try_get(7)?,
        idempotency_key: row.try_get(8)?,
        request_digest: row.try_get(9)?,
    })
}

fn lease_columns(row: &PgRow) -> Result<LeaseColumns> {
    Ok(LeaseColumns {
        id: row.try_get(0)?,
        task_id: row.try_get(1)?,
        scope: row.try_get(2)?,
        kind: row.try_get(3)?,
        audience: row.try_get(4)?,
        state: row.try_get(5)?,
        kid: row.try_get(6)?,
        issued_at: row.try_get(7)?,
        expires_at: row.try_get(8)?,
        renewable_until: row.try_get(9)?,
        ended_at: row.try_get(10)?,
        secret_sha256: row.try_get(11)?,
    })
}
