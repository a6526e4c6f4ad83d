//! Group commit on PostgreSQL: hot writes as data, many applied in one transaction with array
//! binds.
//!
//! A committer takes every write waiting and applies them in one transaction whose statements
//! each carry the rows of all its writes (`UNNEST` of arrays): the tasks it touches locked in id
//! order, new tasks, new leases, renewals, completions and their lease sweeps, the feed, the
//! audit events. A handful of round trips per batch instead of several per request, and one WAL
//! flush for all of them.
//!
//! The writes are decided in the order they arrived, against the locked rows of their tasks, so
//! the outcome is the one running them one after another would give: a lease added before a
//! completion of its task is swept by it, one added after is refused, and so is a renewal after
//! the completion. Being data, a write can also be applied again on its own when its batch
//! fails.

use std::collections::{HashMap, HashSet};

use sqlx::{PgConnection, Row};

use super::{audit, feed};
use crate::audit::AuditEvent;
use crate::domain::{LeaseState, RevocationReason, TaskId, TaskState, UnixMillis};
use crate::error::{Error, Result};
use crate::store::records::{
    EndedLease, FeedEvent, LeaseRecord, NewLeaseOutcome, Renewal, RenewalOutcome, SvidRecord,
    TaskInsertion, TaskRecord, ended_leases, task_ended,
};

/// One hot write.
#[derive(Debug)]
pub enum Write {
    /// Audit events that record no other change (refusals, use checks).
    Events(Vec<AuditEvent>),
    /// A new task with its first leases; nothing is stored if its idempotency key is taken.
    NewTask {
        task: TaskRecord,
        leases: Vec<LeaseRecord>,
        events: Vec<AuditEvent>,
    },
    /// A lease for an active task that `workload_id` owns.
    AddLease {
        workload_id: String,
        lease: LeaseRecord,
        now: UnixMillis,
        events: Vec<AuditEvent>,
    },
    /// An issued, unexpired lease of an active task moved to a new window.
    Renew {
        renewal: Renewal,
        events: Vec<AuditEvent>,
    },
    /// An active task of `workload_id` completed, its issued leases revoked.
    Complete {
        task_id: TaskId,
        workload_id: String,
        now: UnixMillis,
        actor: String,
    },
    /// A join token consumed, if it is unused, unrevoked and unexpired at `now`, with the
    /// X.509-SVID it bought.
    ConsumeJoinToken {
        id: String,
        now: UnixMillis,
        svid: SvidRecord,
        events: Vec<AuditEvent>,
    },
    /// An X.509-SVID issued without a join token (a Unix or JWT attestation, a renewal).
    InsertSvid {
        svid: SvidRecord,
        events: Vec<AuditEvent>,
    },
}

/// What a write did, variant for variant.
#[derive(Debug)]
pub enum Outcome {
    Stored,
    TaskInserted(TaskInsertion),
    LeaseAdded(NewLeaseOutcome),
    Renewed(RenewalOutcome),
    /// The revoked leases, or `None` when the task was not active.
    Completed(Option<Vec<EndedLease>>),
    /// Whether the join token was consumed (and its SVID stored).
    JoinTokenConsumed(bool),
}

/// The error for a committer answering a write with another kind of write's outcome.
pub fn unexpected(outcome: Outcome) -> Error {
    Error::internal(format!(
        "the committer answered with an unexpected outcome: {outcome:?}"
    ))
}

/// A locked task row, as the batch's writes change it.
struct TaskView {
    workload_id: String,
    state: TaskState,
    deadline: UnixMillis,
}

/// Applies `writes` in the caller's transaction: one outcome per write, and the feed events the
/// batch appended.
pub async fn apply(
    connection: &mut PgConnection,
    writes: &[Write],
) -> Result<(Vec<Outcome>, Vec<FeedEvent>)> {
    let mut tasks = lock_tasks(connection, writes).await?;
    let live = lock_live_workloads(connection, writes).await?;
    let inserted = insert_tasks(connection, writes, &live).await?;
    let consumed = consume_join_tokens(connection, writes).await?;

    let mut outcomes = Vec::with_capacity(writes.len());
    let mut new_leases: Vec<&LeaseRecord> = Vec::new();
    let mut renewals: Vec<(usize, &Renewal)> = Vec::new();
    let mut completions: Vec<(usize, &str, UnixMillis, &str)> = Vec::new();
    for (index, write) in writes.iter().enumerate() {
        outcomes.push(match write {
            Write::Events(_) => Outcome::Stored,
            Write::NewTask { task, leases, .. } => {
                Outcome::TaskInserted(if !live.contains(task.workload_id.as_str()) {
                    TaskInsertion::IdentityRevoked
                } else if inserted.contains(task.id.as_str()) {
                    new_leases.extend(leases);
                    TaskInsertion::Inserted
                } else {
                    TaskInsertion::KeyTaken
                })
            }
            Write::AddLease {
                workload_id,
                lease,
                now,
                ..
            } => {
                let is_open = tasks.get(lease.task_id.as_str()).is_some_and(|task| {
                    task.workload_id == *workload_id
                        && task.state == TaskState::Active
                        && task.deadline > *now
                });
                if is_open {
                    new_leases.push(lease);
                    Outcome::LeaseAdded(NewLeaseOutcome::Added)
                } else {
                    Outcome::LeaseAdded(NewLeaseOutcome::TaskNotActive)
                }
            }
            Write::Renew { renewal, .. } => {
                let is_active = tasks
                    .get(renewal.task_id.as_str())
                    .is_some_and(|task| task.state == TaskState::Active);
                if is_active {
                    renewals.push((index, renewal));
                }
                // Decided below, by whether the lease row is still issued and unexpired.
                Outcome::Renewed(RenewalOutcome::NotRenewable)
            }
            Write::Complete {
                task_id,
                workload_id,
                now,
                actor,
            } => match tasks.get_mut(task_id.as_str()) {
                Some(task)
                    if task.workload_id == *workload_id && task.state == TaskState::Active =>
                {
                    task.state = TaskState::Completed;
                    completions.push((index, task_id.as_str(), *now, actor.as_str()));
                    Outcome::Completed(Some(Vec::new()))
                }
                _ => Outcome::Completed(None),
            },
            Write::ConsumeJoinToken { .. } => Outcome::JoinTokenConsumed(consumed.contains(&index)),
            Write::InsertSvid { .. } => Outcome::Stored,
        });
    }
    let svids: Vec<&SvidRecord> = writes
        .iter()
        .zip(&outcomes)
        .filter_map(|(write, outcome)| match (write, outcome) {
            (Write::ConsumeJoinToken { svid, .. }, Outcome::JoinTokenConsumed(true))
            | (Write::InsertSvid { svid, .. }, _) => Some(svid),
            _ => None,
        })
        .collect();
    insert_svids(connection, &svids).await?;

    insert_leases(connection, &new_leases).await?;
    for index in renew(connection, &renewals).await? {
        outcomes[index] = Outcome::Renewed(RenewalOutcome::Renewed);
    }
    let mut feed_events: Vec<(FeedEvent, &str)> = Vec::new();
    for (index, ended) in complete(connection, &completions).await? {
        let actor = completions
            .iter()
            .find(|(completed, ..)| *completed == index)
            .map_or("", |(_, _, _, actor)| *actor);
        outcomes[index] = Outcome::Completed(Some(ended_leases(&ended)));
        feed_events.extend(ended.into_iter().map(|event| (event, actor)));
    }
    feed::append(connection, &feed_events).await?;

    let events: Vec<&AuditEvent> = writes
        .iter()
        .zip(&outcomes)
        .flat_map(|(write, outcome)| recorded_events(write, outcome))
        .collect();
    audit::insert_events(connection, &events).await?;
    Ok((
        outcomes,
        feed_events.into_iter().map(|(event, _)| event).collect(),
    ))
}

/// The audit events a write leaves when its outcome is `outcome`: none for what did not happen.
fn recorded_events<'w>(write: &'w Write, outcome: &Outcome) -> &'w [AuditEvent] {
    match (write, outcome) {
        (Write::Events(events), _)
        | (Write::NewTask { events, .. }, Outcome::TaskInserted(TaskInsertion::Inserted))
        | (Write::AddLease { events, .. }, Outcome::LeaseAdded(NewLeaseOutcome::Added))
        | (Write::Renew { events, .. }, Outcome::Renewed(RenewalOutcome::Renewed))
        | (Write::ConsumeJoinToken { events, .. }, Outcome::JoinTokenConsumed(true))
        | (Write::InsertSvid { events, .. }, _) => events,
        _ => &[],
    }
}

/// Locks every task the batch's writes touch, in id order (the one lock order of the store),
/// and returns their rows.
async fn lock_tasks(
    connection: &mut PgConnection,
    writes: &[Write],
) -> Result<HashMap<String, TaskView>> {
    let mut ids: Vec<&str> = writes
        .iter()
        .filter_map(|write| match write {
            Write::AddLease { lease, .. } => Some(lease.task_id.as_str()),
            Write::Renew { renewal, .. } => Some(renewal.task_id.as_str()),
            Write::Complete { task_id, .. } => Some(task_id.as_str()),
            Write::Events(_)
            | Write::NewTask { .. }
            | Write::ConsumeJoinToken { .. }
            | Write::InsertSvid { .. } => None,
        })
        .collect();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    ids.sort_unstable();
    ids.dedup();
    let rows = sqlx::query(
        "SELECT id, workload_id, state, deadline FROM tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(ids)
    .fetch_all(&mut *connection)
    .await?;
    rows.iter()
        .map(|row| {
            let state: String = row.try_get(2)?;
            Ok((
                row.try_get(0)?,
                TaskView {
                    workload_id: row.try_get(1)?,
                    state: crate::store::records::parse_stored(
                        "tasks.state",
                        &state,
                        TaskState::from_stored,
                    )?,
                    deadline: UnixMillis(row.try_get(3)?),
                },
            ))
        })
        .collect()
}

/// The batch's new tasks.
fn new_tasks(writes: &[Write]) -> impl Iterator<Item = &TaskRecord> {
    writes.iter().filter_map(|write| match write {
        Write::NewTask { task, .. } => Some(task),
        _ => None,
    })
}

/// Share-locks the workloads that open the batch's new tasks and returns those whose identity
/// is not revoked. The kill switch holds its workload row `FOR UPDATE` while it sets
/// `revoked_at`, so this either waits and then sees the revocation (READ COMMITTED re-checks a
/// row it waited for), or commits its tasks before the kill switch lists the ones to revoke.
async fn lock_live_workloads(
    connection: &mut PgConnection,
    writes: &[Write],
) -> Result<HashSet<String>> {
    let mut ids: Vec<&str> = new_tasks(writes)
        .map(|task| task.workload_id.as_str())
        .collect();
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    ids.sort_unstable();
    ids.dedup();
    let rows = sqlx::query(
        "SELECT id FROM workloads WHERE id = ANY($1) AND revoked_at IS NULL ORDER BY id FOR SHARE",
    )
    .bind(ids)
    .fetch_all(&mut *connection)
    .await?;
    rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
}

/// Inserts the batch's new tasks of `live` workloads; returns the ids actually inserted (a task
/// whose workload already used its idempotency key is not).
async fn insert_tasks(
    connection: &mut PgConnection,
    writes: &[Write],
    live: &HashSet<String>,
) -> Result<HashSet<String>> {
    let tasks: Vec<&TaskRecord> = new_tasks(writes)
        .filter(|task| live.contains(task.workload_id.as_str()))
        .collect();
    if tasks.is_empty() {
        return Ok(HashSet::new());
    }
    let contexts = tasks
        .iter()
        .map(|task| serde_json::to_string(&task.context).map_err(Error::internal))
        .collect::<Result<Vec<_>>>()?;
    let rows = sqlx::query(
        "INSERT INTO tasks (id, workload_id, purpose, context_json, state, created_at, deadline, \
         idempotency_key, request_digest) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], \
         $7::bigint[], $8::text[], $9::text[]) \
         ON CONFLICT (workload_id, idempotency_key) DO NOTHING RETURNING id",
    )
    .bind(tasks.iter().map(|task| task.id.as_str()).collect::<Vec<_>>())
    .bind(tasks.iter().map(|task| task.workload_id.as_str()).collect::<Vec<_>>())
    .bind(tasks.iter().map(|task| task.purpose.as_str()).collect::<Vec<_>>())
    .bind(contexts)
    .bind(tasks.iter().map(|task| task.state.as_str()).collect::<Vec<_>>())
    .bind(tasks.iter().map(|task| task.created_at.0).collect::<Vec<_>>())
    .bind(tasks.iter().map(|task| task.deadline.0).collect::<Vec<_>>())
    .bind(tasks.iter().map(|task| task.idempotency_key.as_deref()).collect::<Vec<_>>())
    .bind(tasks.iter().map(|task| task.request_digest.as_deref()).collect::<Vec<_>>())
    .fetch_all(&mut *connection)
    .await?;
    rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
}

/// Inserts `leases` in one statement.
pub async fn insert_leases(connection: &mut PgConnection, leases: &[&LeaseRecord]) -> Result<()> {
    if leases.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO leases (id, task_id, scope, kind, audience, state, kid, issued_at, expires_at, \
         renewable_until, ended_at, secret_sha256) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bytea[])",
    )
    .bind(leases.iter().map(|lease| lease.id.as_str()).collect::<Vec<_>>())
    .bind(leases.iter().map(|lease| lease.task_id.as_str()).collect::<Vec<_>>())
    .bind(leases.iter().map(|lease| lease.scope.as_str()).collect::<Vec<_>>())
    .bind(leases.iter().map(|lease| lease.kind.as_str()).collect::<Vec<_>>())
    .bind(leases.iter().map(|lease| lease.audience.as_str()).collect::<Vec<_>>())
    .bind(leases.iter().map(|lease| lease.state.as_str()).collect::<Vec<_>>())
    .bind(leases.iter().map(|lease| lease.kid.as_deref()).collect::<Vec<_>>())
    .bind(leases.iter().map(|lease| lease.window.issued_at.0).collect::<Vec<_>>())
    .bind(leases.iter().map(|lease| lease.window.expires_at.0).collect::<Vec<_>>())
    .bind(leases.iter().map(|lease| lease.window.renewable_until.0).collect::<Vec<_>>())
    .bind(leases.iter().map(|lease| lease.ended_at.map(|at| at.0)).collect::<Vec<_>>())
    .bind(
        leases
            .iter()
            .map(|lease| lease.secret_sha256.as_deref())
            .collect::<Vec<_>>(),
    )
    .execute(connection)
    .await?;
    Ok(())
}

/// Applies the renewals whose lease is still issued and unexpired (checked on the locked lease
/// row); returns the indexes of the writes that renewed.
async fn renew(
    connection: &mut PgConnection,
    renewals: &[(usize, &Renewal)],
) -> Result<Vec<usize>> {
    if renewals.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "UPDATE leases l SET issued_at = v.issued_at, expires_at = v.expires_at, kid = v.kid \
         FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[]) \
         AS v(id, issued_at, expires_at, kid, now) \
         WHERE l.id = v.id AND l.state = 'issued' AND l.expires_at > v.now RETURNING l.id",
    )
    .bind(
        renewals
            .iter()
            .map(|(_, renewal)| renewal.lease_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        renewals
            .iter()
            .map(|(_, renewal)| renewal.window.issued_at.0)
            .collect::<Vec<_>>(),
    )
    .bind(
        renewals
            .iter()
            .map(|(_, renewal)| renewal.window.expires_at.0)
            .collect::<Vec<_>>(),
    )
    .bind(
        renewals
            .iter()
            .map(|(_, renewal)| renewal.kid.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        renewals
            .iter()
            .map(|(_, renewal)| renewal.now.0)
            .collect::<Vec<_>>(),
    )
    .fetch_all(connection)
    .await?;
    let renewed: HashSet<String> = rows
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    Ok(renewals
        .iter()
        .filter(|(_, renewal)| renewed.contains(renewal.lease_id.as_str()))
        .map(|(index, _)| *index)
        .collect())
}

/// Completes the tasks of `completions` (already locked and checked active) and revokes their
/// issued leases; returns, per completing write, its feed events (leases, then the task).
async fn complete(
    connection: &mut PgConnection,
    completions: &[(usize, &str, UnixMillis, &str)],
) -> Result<Vec<(usize, Vec<FeedEvent>)>> {
    if completions.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = completions.iter().map(|(_, id, ..)| *id).collect();
    let nows: Vec<i64> = completions.iter().map(|(_, _, now, _)| now.0).collect();
    sqlx::query(
        "UPDATE tasks t SET state = 'completed', ended_at = v.now \
         FROM UNNEST($1::text[], $2::bigint[]) AS v(id, now) WHERE t.id = v.id",
    )
    .bind(&ids)
    .bind(&nows)
    .execute(&mut *connection)
    .await?;
    let ended = end_leases_of_tasks(
        connection,
        &ids,
        &nows,
        LeaseState::Revoked,
        RevocationReason::TaskCompleted,
    )
    .await?;
    Ok(completions
        .iter()
        .map(|(index, id, now, _)| {
            (
                *index,
                with_task_event(
                    ended.get(*id).cloned().unwrap_or_default(),
                    id,
                    RevocationReason::TaskCompleted,
                    *now,
                ),
            )
        })
        .collect())
}

/// Ends the issued leases of the tasks `ids` (ended at the matching `nows`), in one statement;
/// the feed events per task.
pub async fn end_leases_of_tasks(
    connection: &mut PgConnection,
    ids: &[&str],
    nows: &[i64],
    new_state: LeaseState,
    reason: RevocationReason,
) -> Result<HashMap<String, Vec<FeedEvent>>> {
    super::grants::cancel_for_tasks(&mut *connection, ids, nows).await?;
    let rows = sqlx::query(
        "UPDATE leases l SET state = $3, ended_at = v.now FROM UNNEST($1::text[], $2::bigint[]) \
         AS v(task_id, now) WHERE l.task_id = v.task_id AND l.state = 'issued' \
         RETURNING l.id, l.task_id, l.scope, l.audience, l.expires_at, v.now",
    )
    .bind(ids)
    .bind(nows)
    .bind(new_state.as_str())
    .fetch_all(connection)
    .await?;
    let mut ended: HashMap<String, Vec<FeedEvent>> = HashMap::new();
    for row in rows {
        let task_id: String = row.try_get(1)?;
        ended.entry(task_id.clone()).or_default().push(FeedEvent {
            lease_id: Some(row.try_get(0)?),
            task_id,
            scope: Some(row.try_get(2)?),
            audience: Some(row.try_get(3)?),
            reason,
            not_after: UnixMillis(row.try_get(4)?),
            occurred_at: UnixMillis(row.try_get(5)?),
        });
    }
    for events in ended.values_mut() {
        events.sort_by(|a, b| a.lease_id.cmp(&b.lease_id));
    }
    Ok(ended)
}

/// `lease_events` of an ended task followed by the task's own event.
pub fn with_task_event(
    mut lease_events: Vec<FeedEvent>,
    task_id: &str,
    reason: RevocationReason,
    now: UnixMillis,
) -> Vec<FeedEvent> {
    let task = task_ended(task_id, reason, &lease_events, now);
    lease_events.push(task);
    lease_events
}

/// Consumes the batch's join tokens in one conditional statement, so that of two uses of one
/// token (in this batch, or on another replica) exactly one sees its row change; returns the
/// indexes of the writes whose token it consumed. Within the batch, only the first use of a
/// token is tried.
async fn consume_join_tokens(
    connection: &mut PgConnection,
    writes: &[Write],
) -> Result<HashSet<usize>> {
    // One row per token (its first use), so that the statement checks that use's own time.
    let mut seen = HashSet::new();
    let wanted: Vec<(usize, &str, i64)> = writes
        .iter()
        .enumerate()
        .filter_map(|(index, write)| match write {
            Write::ConsumeJoinToken { id, now, .. } if seen.insert(id.as_str()) => {
                Some((index, id.as_str(), now.0))
            }
            _ => None,
        })
        .collect();
    if wanted.is_empty() {
        return Ok(HashSet::new());
    }
    let updated: HashSet<String> = sqlx::query(
        "UPDATE join_tokens AS token SET consumed_at = wanted.now \
         FROM UNNEST($1::text[], $2::bigint[]) AS wanted(id, now) \
         WHERE token.id = wanted.id AND token.consumed_at IS NULL \
         AND token.revoked_at IS NULL AND token.expires_at > wanted.now \
         RETURNING token.id",
    )
    .bind(wanted.iter().map(|(_, id, _)| *id).collect::<Vec<_>>())
    .bind(wanted.iter().map(|(_, _, now)| *now).collect::<Vec<_>>())
    .fetch_all(&mut *connection)
    .await?
    .iter()
    .map(|row| row.try_get(0))
    .collect::<std::result::Result<_, _>>()?;
    Ok(wanted
        .into_iter()
        .filter(|(_, id, _)| updated.contains(*id))
        .map(|(index, ..)| index)
        .collect())
}

/// Stores the batch's SVIDs in one statement.
async fn insert_svids(connection: &mut PgConnection, svids: &[&SvidRecord]) -> Result<()> {
    if svids.is_empty() {
        return Ok(());
    }
    let column =
        |pick: fn(&SvidRecord) -> &str| svids.iter().map(|svid| pick(svid)).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO svids (thumbprint, workload_id, serial, issued_at, expires_at) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])",
    )
    .bind(column(|svid| &svid.thumbprint))
    .bind(column(|svid| &svid.workload_id))
    .bind(column(|svid| &svid.serial))
    .bind(
        svids
            .iter()
            .map(|svid| svid.issued_at.0)
            .collect::<Vec<_>>(),
    )
    .bind(
        svids
            .iter()
            .map(|svid| svid.expires_at.0)
            .collect::<Vec<_>>(),
    )
    .execute(&mut *connection)
    .await?;
    Ok(())
}
