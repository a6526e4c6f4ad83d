//! Grant requests waiting for approval, on PostgreSQL. An answer locks its task's row and then
//! its request's (`FOR UPDATE`), the order a task's completion takes them in, before it reads
//! the answers so far: two operators answering at once on two replicas are serialized (the
//! second sees the first's approval, and exactly one of them issues the lease), and an answer
//! racing the task's completion either issues a lease the completion then revokes or finds the
//! request cancelled.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use super::{audit, batch};
use crate::audit::AuditEvent;
use crate::domain::task::{GrantRequestState, Verdict};
use crate::domain::{LeaseId, TaskId, UnixMillis};
use crate::error::{Error, Result};
use crate::store::NewJob;
use crate::store::records::{
    APPROVAL_COLUMNS, ApprovalColumns, ApprovalRecord, GRANT_NOT_DECIDED_IN_TIME,
    GRANT_REQUEST_COLUMNS, GRANT_TASK_ENDED, GrantDecision, GrantDecisionOutcome,
    GrantRequestColumns, GrantRequestInsertion, GrantRequestRecord, PendingFilter,
};

pub async fn insert(
    connection: &mut PgConnection,
    request: &GrantRequestRecord,
    max_pending: u32,
    now: UnixMillis,
    events: &[AuditEvent],
    jobs: &[NewJob],
) -> Result<GrantRequestInsertion> {
    // One workload's requests are counted and inserted one at a time, across its tasks and
    // the replicas, so the cap holds.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("grant_requests:{}", request.workload_id))
        .execute(&mut *connection)
        .await?;
    if !task_is_open(connection, &request.task_id, &request.workload_id, now).await? {
        return Ok(GrantRequestInsertion::TaskNotActive);
    }
    let pending: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM grant_requests \
         WHERE workload_id = $1 AND state = 'pending' AND wait_until > $2",
    )
    .bind(&request.workload_id)
    .bind(now.0)
    .fetch_one(&mut *connection)
    .await?;
    let pending = u32::try_from(pending).unwrap_or(u32::MAX);
    if pending >= max_pending {
        return Ok(GrantRequestInsertion::TooManyPending(pending));
    }
    let labels = serde_json::to_string(&request.approver_labels).map_err(Error::internal)?;
    sqlx::query(&format!(
        "INSERT INTO grant_requests ({GRANT_REQUEST_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
    ))
    .bind(request.id.as_str())
    .bind(request.task_id.as_str())
    .bind(&request.workload_id)
    .bind(&request.workload_name)
    .bind(request.scope.as_str())
    .bind(i64::from(request.ttl_seconds))
    .bind(&request.request_digest)
    .bind(&request.detail_json)
    .bind(i64::from(request.quorum))
    .bind(labels)
    .bind(request.state.as_str())
    .bind(request.created_at.0)
    .bind(request.wait_until.0)
    .bind(request.decided_at.map(|at| at.0))
    .bind(&request.reason)
    .execute(&mut *connection)
    .await?;
    audit::insert_events(connection, &events.iter().collect::<Vec<_>>()).await?;
    if !jobs.is_empty() {
        super::jobs::enqueue(connection, jobs, &[]).await?;
    }
    Ok(GrantRequestInsertion::Inserted)
}

pub async fn find(pool: &PgPool, id: &LeaseId) -> Result<Option<GrantRequestRecord>> {
    let mut connection = pool.acquire().await?;
    find_locked(&mut connection, id, false).await
}

pub async fn pending(
    pool: &PgPool,
    after: Option<&LeaseId>,
    filter: &PendingFilter,
    limit: usize,
    now: UnixMillis,
) -> Result<Vec<GrantRequestRecord>> {
    let mut connection = pool.acquire().await?;
    let rows = sqlx::query(&format!(
        "SELECT {GRANT_REQUEST_COLUMNS} FROM grant_requests \
         WHERE state = 'pending' AND wait_until > $3 AND id > $1 \
         AND ($4::text IS NULL OR workload_name = $4) AND ($5::text IS NULL OR scope = $5) \
         AND ($6::text IS NULL OR task_id = $6) \
         ORDER BY id LIMIT $2"
    ))
    .bind(after.map_or("", LeaseId::as_str))
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .bind(now.0)
    .bind(filter.workload.as_deref())
    .bind(filter.scope.as_deref())
    .bind(filter.task.as_deref())
    .fetch_all(&mut *connection)
    .await?;
    let columns = rows
        .iter()
        .map(request_columns)
        .collect::<Result<Vec<_>>>()?;
    // The page's approvals in one query, not one per request.
    let ids: Vec<&str> = columns.iter().map(|columns| columns.id.as_str()).collect();
    let approval_rows = sqlx::query(&format!(
        "SELECT request_id, {APPROVAL_COLUMNS} FROM grant_approvals \
         WHERE request_id = ANY($1) ORDER BY decided_at, approver_id"
    ))
    .bind(&ids)
    .fetch_all(&mut *connection)
    .await?;
    let mut approvals: std::collections::HashMap<String, Vec<ApprovalRecord>> =
        std::collections::HashMap::new();
    for row in &approval_rows {
        let request_id: String = row.try_get(0)?;
        let approval = approval_columns(row, 1)?.into_record()?;
        approvals.entry(request_id).or_default().push(approval);
    }
    columns
        .into_iter()
        .map(|columns| {
            let of_request = approvals.remove(&columns.id).unwrap_or_default();
            columns.into_record(of_request)
        })
        .collect()
}

pub async fn decide(
    connection: &mut PgConnection,
    decision: &GrantDecision,
    now: UnixMillis,
) -> Result<GrantDecisionOutcome> {
    let task_id: Option<String> =
        sqlx::query_scalar("SELECT task_id FROM grant_requests WHERE id = $1")
            .bind(decision.request_id.as_str())
            .fetch_optional(&mut *connection)
            .await?;
    let Some(task_id) = task_id else {
        return Ok(GrantDecisionOutcome::Unknown);
    };
    sqlx::query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(&task_id)
        .execute(&mut *connection)
        .await?;
    let Some(request) = find_locked(connection, &decision.request_id, true).await? else {
        return Ok(GrantDecisionOutcome::Unknown);
    };
    if request.state != GrantRequestState::Pending {
        return Ok(GrantDecisionOutcome::NotPending(request.state));
    }
    if request.wait_until <= now {
        end(
            connection,
            &request.id,
            GrantRequestState::Expired,
            GRANT_NOT_DECIDED_IN_TIME,
            now,
        )
        .await?;
        return Ok(GrantDecisionOutcome::Expired);
    }
    if !task_is_open(connection, &request.task_id, &request.workload_id, now).await? {
        end(
            connection,
            &request.id,
            GrantRequestState::Cancelled,
            GRANT_TASK_ENDED,
            now,
        )
        .await?;
        return Ok(GrantDecisionOutcome::TaskEnded);
    }
    let approval = &decision.approval;
    // A second approval by one operator changes nothing; a denial replaces its own approval.
    let on_conflict = match approval.verdict {
        Verdict::Approve => "DO NOTHING",
        Verdict::Deny => {
            "DO UPDATE SET verdict = excluded.verdict, reason = excluded.reason, \
             decided_at = excluded.decided_at"
        }
    };
    let answered = sqlx::query(&format!(
        "INSERT INTO grant_approvals (request_id, {APPROVAL_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (request_id, approver_id) {on_conflict}"
    ))
    .bind(request.id.as_str())
    .bind(&approval.approver_id)
    .bind(&approval.approver_name)
    .bind(approval.verdict.as_str())
    .bind(&approval.reason)
    .bind(approval.decided_at.0)
    .execute(&mut *connection)
    .await?
    .rows_affected();
    if answered == 0 {
        return Ok(GrantDecisionOutcome::AlreadyAnswered);
    }
    let events: Vec<&AuditEvent> = decision.events.iter().collect();
    if approval.verdict == Verdict::Deny {
        end(
            connection,
            &request.id,
            GrantRequestState::Denied,
            &approval.reason,
            now,
        )
        .await?;
        audit::insert_events(connection, &events).await?;
        return Ok(GrantDecisionOutcome::Denied);
    }
    let approvals: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM grant_approvals WHERE request_id = $1 AND verdict = 'approve'",
    )
    .bind(request.id.as_str())
    .fetch_one(&mut *connection)
    .await?;
    let approvals = u32::try_from(approvals).unwrap_or(u32::MAX);
    audit::insert_events(connection, &events).await?;
    if approvals < request.quorum {
        return Ok(GrantDecisionOutcome::Recorded { approvals });
    }
    let lease = decision
        .lease
        .as_ref()
        .ok_or_else(|| Error::internal("an approval came without its lease"))?;
    sqlx::query("UPDATE grant_requests SET state = 'issued', decided_at = $1 WHERE id = $2")
        .bind(now.0)
        .bind(request.id.as_str())
        .execute(&mut *connection)
        .await?;
    batch::insert_leases(connection, &[lease]).await?;
    audit::insert_events(
        connection,
        &decision.issued_events.iter().collect::<Vec<_>>(),
    )
    .await?;
    Ok(GrantDecisionOutcome::Issued)
}

/// Marks up to `limit` requests whose wait ended before `now` as expired; returns them.
pub async fn expire(
    connection: &mut PgConnection,
    now: UnixMillis,
    limit: usize,
) -> Result<Vec<GrantRequestRecord>> {
    let ids: Vec<String> = sqlx::query_scalar(
        "UPDATE grant_requests SET state = 'expired', decided_at = $1, reason = $2 \
         WHERE id IN (SELECT id FROM grant_requests WHERE state = 'pending' AND wait_until <= $1 \
                      ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
         RETURNING id",
    )
    .bind(now.0)
    .bind(GRANT_NOT_DECIDED_IN_TIME)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&mut *connection)
    .await?;
    let mut expired = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(request) = find_locked(connection, &LeaseId::from_stored(id), false).await? {
            expired.push(request);
        }
    }
    Ok(expired)
}

/// Cancels the pending requests of tasks that just ended (each at its `nows` instant); those
/// whose wait ended before are left for the expiry sweep: they expired.
pub async fn cancel_for_tasks(
    connection: &mut PgConnection,
    task_ids: &[&str],
    nows: &[i64],
) -> Result<()> {
    sqlx::query(
        "UPDATE grant_requests g SET state = 'cancelled', decided_at = v.now, reason = $3 \
         FROM UNNEST($1::text[], $2::bigint[]) AS v(task_id, now) \
         WHERE g.task_id = v.task_id AND g.state = 'pending' AND g.wait_until > v.now",
    )
    .bind(task_ids)
    .bind(nows)
    .bind(GRANT_TASK_ENDED)
    .execute(connection)
    .await?;
    Ok(())
}

async fn find_locked(
    connection: &mut PgConnection,
    id: &LeaseId,
    for_update: bool,
) -> Result<Option<GrantRequestRecord>> {
    let lock = if for_update { " FOR UPDATE" } else { "" };
    let row = sqlx::query(&format!(
        "SELECT {GRANT_REQUEST_COLUMNS} FROM grant_requests WHERE id = $1{lock}"
    ))
    .bind(id.as_str())
    .fetch_optional(&mut *connection)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let columns = request_columns(&row)?;
    let approvals = approvals_of(connection, &columns.id).await?;
    columns.into_record(approvals).map(Some)
}

async fn task_is_open(
    connection: &mut PgConnection,
    id: &TaskId,
    workload_id: &str,
    now: UnixMillis,
) -> Result<bool> {
    Ok(sqlx::query(
        "SELECT 1 FROM tasks WHERE id = $1 AND workload_id = $2 AND state = 'active' \
         AND deadline > $3",
    )
    .bind(id.as_str())
    .bind(workload_id)
    .bind(now.0)
    .fetch_optional(connection)
    .await?
    .is_some())
}

async fn end(
    connection: &mut PgConnection,
    id: &LeaseId,
    state: GrantRequestState,
    reason: &str,
    now: UnixMillis,
) -> Result<()> {
    sqlx::query(
        "UPDATE grant_requests SET state = $1, decided_at = $2, reason = $3 \
         WHERE id = $4 AND state = 'pending'",
    )
    .bind(state.as_str())
    .bind(now.0)
    .bind(reason)
    .bind(id.as_str())
    .execute(connection)
    .await?;
    Ok(())
}

async fn approvals_of(connection: &mut PgConnection, id: &str) -> Result<Vec<ApprovalRecord>> {
    let rows = sqlx::query(&format!(
        "SELECT {APPROVAL_COLUMNS} FROM grant_approvals WHERE request_id = $1 \
         ORDER BY decided_at, approver_id"
    ))
    .bind(id)
    .fetch_all(connection)
    .await?;
    rows.iter()
        .map(|row| approval_columns(row, 0)?.into_record())
        .collect()
}

/// An approval's columns, read from `row` starting at column `first`.
fn approval_columns(row: &PgRow, first: usize) -> Result<ApprovalColumns> {
    Ok(ApprovalColumns {
        approver_id: row.try_get(first)?,
        approver_name: row.try_get(first + 1)?,
        verdict: row.try_get(first + 2)?,
        reason: row.try_get(first + 3)?,
        decided_at: row.try_get(first + 4)?,
    })
}

fn request_columns(row: &PgRow) -> Result<GrantRequestColumns> {
    Ok(GrantRequestColumns {
        id: row.try_get(0)?,
        task_id: row.try_get(1)?,
        workload_id: row.try_get(2)?,
        workload_name: row.try_get(3)?,
        scope: row.try_get(4)?,
        ttl_seconds: row.try_get(5)?,
        request_digest: row.try_get(6)?,
        detail_json: row.try_get(7)?,
        quorum: row.try_get(8)?,
        approver_labels_json: row.try_get(9)?,
        state: row.try_get(10)?,
        created_at: row.try_get(11)?,
        wait_until: row.try_get(12)?,
        decided_at: row.try_get(13)?,
        reason: row.try_get(14)?,
    })
}
