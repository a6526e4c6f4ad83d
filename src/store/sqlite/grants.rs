//! Grant requests waiting for approval, on SQLite. Every write runs on the one writer
//! connection, so two operators' answers never interleave: the one that completes the quorum
//! sees every answer before it and issues the lease once.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::writer::Write;
use super::{audit, tasks};
use crate::audit::AuditEvent;
use crate::domain::task::{GrantRequestState, Verdict};
use crate::domain::{LeaseId, UnixMillis};
use crate::error::{Error, Result};
use crate::store::NewJob;
use crate::store::Topic;
use crate::store::records::{
    APPROVAL_COLUMNS, ApprovalColumns, ApprovalRecord, GRANT_NOT_DECIDED_IN_TIME,
    GRANT_REQUEST_COLUMNS, GRANT_TASK_ENDED, GrantDecision, GrantDecisionOutcome,
    GrantRequestColumns, GrantRequestInsertion, GrantRequestRecord, PendingFilter,
};

pub fn insert(
    write: &mut Write<'_>,
    request: &GrantRequestRecord,
    max_pending: u32,
    now: UnixMillis,
    events: &[AuditEvent],
    jobs: &[NewJob],
) -> Result<GrantRequestInsertion> {
    if !tasks::is_task_open(
        write.connection,
        &request.task_id,
        &request.workload_id,
        now,
    )? {
        return Ok(GrantRequestInsertion::TaskNotActive);
    }
    let pending: u32 = write
        .connection
        .prepare_cached(
            "SELECT COUNT(*) FROM grant_requests \
             WHERE workload_id = ?1 AND state = 'pending' AND wait_until > ?2",
        )?
        .query_row(params![request.workload_id, now.0], |row| row.get(0))?;
    if pending >= max_pending {
        return Ok(GrantRequestInsertion::TooManyPending(pending));
    }
    let labels = serde_json::to_string(&request.approver_labels).map_err(Error::internal)?;
    write
        .connection
        .prepare_cached(&format!(
            "INSERT INTO grant_requests ({GRANT_REQUEST_COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
        ))?
        .execute(params![
            request.id.as_str(),
            request.task_id.as_str(),
            request.workload_id,
            request.workload_name,
            request.scope.as_str(),
            request.ttl_seconds,
            request.request_digest,
            request.detail_json,
            request.quorum,
            labels,
            request.state.as_str(),
            request.created_at.0,
            request.wait_until.0,
            request.decided_at.map(|at| at.0),
            request.reason,
        ])?;
    audit::insert_events(write, events)?;
    if !jobs.is_empty() {
        super::jobs::enqueue(write, jobs, &[])?;
    }
    write.topics.push(Topic::Approvals);
    Ok(GrantRequestInsertion::Inserted)
}

pub fn find(connection: &Connection, id: &LeaseId) -> Result<Option<GrantRequestRecord>> {
    let columns = connection
        .prepare_cached(&format!(
            "SELECT {GRANT_REQUEST_COLUMNS} FROM grant_requests WHERE id = ?1"
        ))?
        .query_row(params![id.as_str()], request_columns)
        .optional()?;
    columns
        .map(|columns| {
            let approvals = approvals_of(connection, &columns.id)?;
            columns.into_record(approvals)
        })
        .transpose()
}

pub fn pending(
    connection: &Connection,
    after: Option<&LeaseId>,
    filter: &PendingFilter,
    limit: usize,
    now: UnixMillis,
) -> Result<Vec<GrantRequestRecord>> {
    let rows = connection
        .prepare_cached(&format!(
            "SELECT {GRANT_REQUEST_COLUMNS} FROM grant_requests \
             WHERE state = 'pending' AND wait_until > ?3 AND id > ?1 \
             AND (?4 IS NULL OR workload_name = ?4) AND (?5 IS NULL OR scope = ?5) \
             AND (?6 IS NULL OR task_id = ?6) \
             ORDER BY id LIMIT ?2"
        ))?
        .query_map(
            params![
                after.map_or("", LeaseId::as_str),
                limit as i64,
                now.0,
                filter.workload,
                filter.scope,
                filter.task
            ],
            request_columns,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|columns| {
            let approvals = approvals_of(connection, &columns.id)?;
            columns.into_record(approvals)
        })
        .collect()
}

pub fn decide(
    write: &mut Write<'_>,
    decision: &GrantDecision,
    now: UnixMillis,
) -> Result<GrantDecisionOutcome> {
    let Some(request) = find(write.connection, &decision.request_id)? else {
        return Ok(GrantDecisionOutcome::Unknown);
    };
    if request.state != GrantRequestState::Pending {
        return Ok(GrantDecisionOutcome::NotPending(request.state));
    }
    if request.wait_until <= now {
        end(
            write,
            &request.id,
            GrantRequestState::Expired,
            GRANT_NOT_DECIDED_IN_TIME,
            now,
        )?;
        return Ok(GrantDecisionOutcome::Expired);
    }
    if !tasks::is_task_open(
        write.connection,
        &request.task_id,
        &request.workload_id,
        now,
    )? {
        end(
            write,
            &request.id,
            GrantRequestState::Cancelled,
            GRANT_TASK_ENDED,
            now,
        )?;
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
    let answered = write
        .connection
        .prepare_cached(&format!(
            "INSERT INTO grant_approvals (request_id, {APPROVAL_COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (request_id, approver_id) {on_conflict}"
        ))?
        .execute(params![
            request.id.as_str(),
            approval.approver_id,
            approval.approver_name,
            approval.verdict.as_str(),
            approval.reason,
            approval.decided_at.0,
        ])?;
    if answered == 0 {
        return Ok(GrantDecisionOutcome::AlreadyAnswered);
    }
    write.topics.push(Topic::Approvals);
    if approval.verdict == Verdict::Deny {
        end(
            write,
            &request.id,
            GrantRequestState::Denied,
            &approval.reason,
            now,
        )?;
        audit::insert_events(write, &decision.events)?;
        return Ok(GrantDecisionOutcome::Denied);
    }
    let approvals: u32 = write
        .connection
        .prepare_cached(
            "SELECT COUNT(*) FROM grant_approvals WHERE request_id = ?1 AND verdict = 'approve'",
        )?
        .query_row(params![request.id.as_str()], |row| row.get(0))?;
    audit::insert_events(write, &decision.events)?;
    if approvals < request.quorum {
        return Ok(GrantDecisionOutcome::Recorded { approvals });
    }
    let lease = decision
        .lease
        .as_ref()
        .ok_or_else(|| Error::internal("an approval came without its lease"))?;
    write
        .connection
        .prepare_cached(
            "UPDATE grant_requests SET state = 'issued', decided_at = ?1 WHERE id = ?2",
        )?
        .execute(params![now.0, request.id.as_str()])?;
    tasks::insert_leases(write.connection, std::slice::from_ref(lease))?;
    audit::insert_events(write, &decision.issued_events)?;
    Ok(GrantDecisionOutcome::Issued)
}

/// Marks up to `limit` requests whose wait ended before `now` as expired; returns them.
pub fn expire(
    write: &mut Write<'_>,
    now: UnixMillis,
    limit: usize,
) -> Result<Vec<GrantRequestRecord>> {
    let ids: Vec<String> = write
        .connection
        .prepare_cached(
            "UPDATE grant_requests SET state = 'expired', decided_at = ?1, reason = ?2 \
             WHERE id IN (SELECT id FROM grant_requests \
                          WHERE state = 'pending' AND wait_until <= ?1 ORDER BY id LIMIT ?3) \
             RETURNING id",
        )?
        .query_map(
            params![now.0, GRANT_NOT_DECIDED_IN_TIME, limit as i64],
            |row| row.get(0),
        )?
        .collect::<rusqlite::Result<_>>()?;
    if !ids.is_empty() {
        write.topics.push(Topic::Approvals);
    }
    ids.into_iter()
        .filter_map(|id| find(write.connection, &LeaseId::from_stored(id)).transpose())
        .collect()
}

/// Cancels the pending requests of a task that just ended (those whose wait ended before are
/// left for the expiry sweep: they expired).
pub fn cancel_for_task(write: &mut Write<'_>, task_id: &str, now: UnixMillis) -> Result<()> {
    let cancelled = write
        .connection
        .prepare_cached(
            "UPDATE grant_requests SET state = 'cancelled', decided_at = ?1, reason = ?2 \
             WHERE task_id = ?3 AND state = 'pending' AND wait_until > ?1",
        )?
        .execute(params![now.0, GRANT_TASK_ENDED, task_id])?;
    if cancelled > 0 {
        write.topics.push(Topic::Approvals);
    }
    Ok(())
}

fn end(
    write: &mut Write<'_>,
    id: &LeaseId,
    state: GrantRequestState,
    reason: &str,
    now: UnixMillis,
) -> Result<()> {
    write
        .connection
        .prepare_cached(
            "UPDATE grant_requests SET state = ?1, decided_at = ?2, reason = ?3 \
             WHERE id = ?4 AND state = 'pending'",
        )?
        .execute(params![state.as_str(), now.0, reason, id.as_str()])?;
    write.topics.push(Topic::Approvals);
    Ok(())
}

fn approvals_of(connection: &Connection, id: &str) -> Result<Vec<ApprovalRecord>> {
    connection
        .prepare_cached(&format!(
            "SELECT {APPROVAL_COLUMNS} FROM grant_approvals WHERE request_id = ?1 \
             ORDER BY decided_at, approver_id"
        ))?
        .query_map(params![id], |row| {
            Ok(ApprovalColumns {
                approver_id: row.get(0)?,
                approver_name: row.get(1)?,
                verdict: row.get(2)?,
                reason: row.get(3)?,
                decided_at: row.get(4)?,
            })
        })?
        .map(|columns| columns.map_err(Error::from)?.into_record())
        .collect()
}

fn request_columns(row: &Row<'_>) -> rusqlite::Result<GrantRequestColumns> {
    Ok(GrantRequestColumns {
        id: row.get(0)?,
        task_id: row.get(1)?,
        workload_id: row.get(2)?,
        workload_name: row.get(3)?,
        scope: row.get(4)?,
        ttl_seconds: row.get(5)?,
        request_digest: row.get(6)?,
        detail_json: row.get(7)?,
        quorum: row.get(8)?,
        approver_labels_json: row.get(9)?,
        state: row.get(10)?,
        created_at: row.get(11)?,
        wait_until: row.get(12)?,
        decided_at: row.get(13)?,
        reason: row.get(14)?,
    })
}
