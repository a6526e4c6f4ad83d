//! Hot writes as data, applied many at a time in one transaction.
//!
//! Because a write is data rather than code, a batch can merge the rows of all its writes: the
//! new tasks of a batch go into one `INSERT`, their leases into another, every audit event into a
//! third. The writer connection then runs a handful of statements per batch instead of several
//! per request, which is what bounded issuance (each statement is a round trip to the
//! connection's thread, or over the network). Being data, a write can also be applied again on its
//! own when its batch fails.
//!
//! Phases run in a fixed order: new tasks, the guards of added leases, every new lease,
//! renewals, completions, the revocation feed, audit events. Completions come after every lease
//! insert, so a completion sweeps a lease the same batch adds to its task; the batch commits as
//! one, and its writes were concurrent, so this order is as valid as the order they arrived in.

use std::collections::{HashMap, HashSet};

use sqlx::{AnyConnection, Row};

use super::audit;
use super::feed::{self, FeedEvent};
use super::records::{LEASE_COLUMNS, LeaseRecord, TaskRecord};
use super::sql::{placeholder_rows, rows_per_statement, spell};
use super::tasks::{EndedLease, NewLeaseOutcome, RenewalOutcome, end_task, ended_leases};
use crate::audit::AuditEvent;
use crate::domain::task::LeaseWindow;
use crate::domain::{LeaseId, LeaseState, RevocationReason, TaskId, UnixMillis};
use crate::error::{Error, Result};

/// One hot write.
#[derive(Debug)]
pub(super) enum Write {
    /// Audit events that record no other change (refusals, use checks).
    Events(Vec<AuditEvent>),
    /// A new task with its first leases; nothing is stored if its idempotency key is taken.
    NewTask {
        task: TaskRecord,
        context_json: String,
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
    /// An issued, unexpired lease moved to a new window signed by `kid`.
    Renew {
        id: LeaseId,
        window: LeaseWindow,
        kid: String,
        now: UnixMillis,
        events: Vec<AuditEvent>,
    },
    /// An active task of `workload_id` completed, its issued leases revoked.
    Complete {
        task_id: TaskId,
        workload_id: String,
        now: UnixMillis,
        actor: String,
    },
}

/// What a write did, variant for variant.
#[derive(Debug)]
pub(super) enum Outcome {
    Stored,
    TaskInserted(bool),
    LeaseAdded(NewLeaseOutcome),
    Renewed(RenewalOutcome),
    /// The revoked leases and the feed position, or `None` when the task was not active.
    Completed(Option<(Vec<EndedLease>, i64)>),
}

/// The error for a committer answering a write with another kind of write's outcome.
pub(super) fn unexpected(outcome: Outcome) -> Error {
    Error::internal(format!(
        "the committer answered with an unexpected outcome: {outcome:?}"
    ))
}

/// Applies `writes` on `connection` (inside the caller's transaction): one outcome per write.
pub(super) async fn apply(
    connection: &mut AnyConnection,
    writes: &[Write],
) -> Result<Vec<Outcome>> {
    let inserted_tasks = insert_tasks(connection, writes).await?;
    let open_tasks = guard_tasks(connection, writes).await?;
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(writes.len());
    let mut leases: Vec<&LeaseRecord> = Vec::new();
    let mut events: Vec<&AuditEvent> = Vec::new();
    for write in writes {
        outcomes.push(match write {
            Write::Events(recorded) => {
                events.extend(recorded);
                Some(Outcome::Stored)
            }
            Write::NewTask {
                task,
                leases: first,
                events: recorded,
                ..
            } => {
                let inserted = inserted_tasks.contains(task.id.as_str());
                if inserted {
                    leases.extend(first);
                    events.extend(recorded);
                }
                Some(Outcome::TaskInserted(inserted))
            }
            Write::AddLease {
                workload_id,
                lease,
                events: recorded,
                ..
            } => {
                let open = open_tasks.contains(&(lease.task_id.as_str(), workload_id.as_str()));
                Some(Outcome::LeaseAdded(if open {
                    leases.push(lease);
                    events.extend(recorded);
                    NewLeaseOutcome::Added
                } else {
                    NewLeaseOutcome::TaskNotActive
                }))
            }
            Write::Renew { .. } | Write::Complete { .. } => None,
        });
    }
    insert_leases(connection, &leases).await?;
    for (write, outcome) in writes.iter().zip(&mut outcomes) {
        if let Write::Renew {
            id,
            window,
            kid,
            now,
            events: recorded,
        } = write
        {
            let renewed = renew(connection, id, *window, kid, *now).await?;
            if renewed == RenewalOutcome::Renewed {
                events.extend(recorded);
            }
            *outcome = Some(Outcome::Renewed(renewed));
        }
    }
    let mut revocations: Vec<(FeedEvent, &str)> = Vec::new();
    let mut completed: Vec<(usize, Vec<EndedLease>)> = Vec::new();
    for (index, write) in writes.iter().enumerate() {
        if let Write::Complete {
            task_id,
            workload_id,
            now,
            actor,
        } = write
        {
            match complete(connection, task_id, workload_id, *now).await? {
                Some(ended) => {
                    completed.push((index, ended_leases(&ended)));
                    revocations.extend(ended.into_iter().map(|event| (event, actor.as_str())));
                }
                None => outcomes[index] = Some(Outcome::Completed(None)),
            }
        }
    }
    if !revocations.is_empty() {
        let feed_seq = feed::append(connection, &revocations).await?;
        for (index, revoked) in completed {
            outcomes[index] = Some(Outcome::Completed(Some((revoked, feed_seq))));
        }
    }
    audit::insert_events(connection, &events).await?;
    Ok(outcomes
        .into_iter()
        .map(|outcome| outcome.unwrap_or(Outcome::Stored))
        .collect())
}

/// Inserts the batch's new tasks; returns the ids actually inserted (a task whose workload
/// already used its idempotency key is not).
async fn insert_tasks(connection: &mut AnyConnection, writes: &[Write]) -> Result<HashSet<String>> {
    const COLUMNS: usize = 10;
    let tasks: Vec<(&TaskRecord, &str, i64)> = writes
        .iter()
        .filter_map(|write| match write {
            Write::NewTask {
                task,
                context_json,
                leases,
                ..
            } => Some((task, context_json.as_str(), leases.len() as i64)),
            _ => None,
        })
        .collect();
    let mut inserted = HashSet::with_capacity(tasks.len());
    for chunk in tasks.chunks(rows_per_statement(COLUMNS)) {
        let sql = spell(
            connection,
            format!(
                "INSERT INTO tasks (id, workload_id, purpose, context_json, state, created_at, deadline, \
             lease_count, idempotency_key, request_digest) VALUES {} ON CONFLICT DO NOTHING RETURNING id",
                placeholder_rows(chunk.len(), COLUMNS)
            ),
        );
        let mut insert = sqlx::query(&sql);
        for (task, context_json, lease_count) in chunk {
            insert = insert
                .bind(task.id.as_str())
                .bind(&task.workload_id)
                .bind(&task.purpose)
                .bind(*context_json)
                .bind(task.state.as_str())
                .bind(task.created_at.0)
                .bind(task.deadline.0)
                .bind(*lease_count)
                .bind(task.idempotency_key.as_deref())
                .bind(task.request_digest.as_deref());
        }
        for row in insert.fetch_all(&mut *connection).await? {
            inserted.insert(row.try_get("id")?);
        }
    }
    Ok(inserted)
}

/// Counts the batch's added leases on their tasks, which must be active, unexpired and owned
/// by the requesting workload; returns the (task, workload) pairs that passed. On PostgreSQL the
/// update's row locks order these writes against a concurrent completion of the same task.
async fn guard_tasks<'w>(
    connection: &mut AnyConnection,
    writes: &'w [Write],
) -> Result<HashSet<(&'w str, &'w str)>> {
    const COLUMNS: usize = 4;
    // Per (task, workload): how many leases, and the latest instant they were decided at.
    let mut guards: HashMap<(&str, &str), (i64, i64)> = HashMap::new();
    for write in writes {
        if let Write::AddLease {
            workload_id,
            lease,
            now,
            ..
        } = write
        {
            let guard = guards
                .entry((lease.task_id.as_str(), workload_id.as_str()))
                .or_insert((0, now.0));
            guard.0 += 1;
            guard.1 = guard.1.max(now.0);
        }
    }
    let guards: Vec<_> = guards.into_iter().collect();
    let mut open = HashSet::with_capacity(guards.len());
    for chunk in guards.chunks(rows_per_statement(COLUMNS)) {
        let sql = spell(
            connection,
            format!(
                "UPDATE tasks SET lease_count = lease_count + v.column3 FROM (VALUES {}) AS v \
             WHERE tasks.id = v.column1 AND tasks.workload_id = v.column2 \
             AND tasks.state = 'active' AND tasks.deadline > v.column4 \
             RETURNING tasks.id, tasks.workload_id",
                placeholder_rows(chunk.len(), COLUMNS)
            ),
        );
        let mut update = sqlx::query(&sql);
        for ((task_id, workload_id), (count, now)) in chunk {
            update = update
                .bind(*task_id)
                .bind(*workload_id)
                .bind(*count)
                .bind(*now);
        }
        for row in update.fetch_all(&mut *connection).await? {
            let (task_id, workload_id): (String, String) =
                (row.try_get("id")?, row.try_get("workload_id")?);
            if let Some(((task_id, workload_id), _)) = chunk
                .iter()
                .find(|((task, workload), _)| *task == task_id && *workload == workload_id)
            {
                open.insert((*task_id, *workload_id));
            }
        }
    }
    Ok(open)
}

/// Inserts `leases`, many per statement.
async fn insert_leases(connection: &mut AnyConnection, leases: &[&LeaseRecord]) -> Result<()> {
    const COLUMNS: usize = 11;
    for chunk in leases.chunks(rows_per_statement(COLUMNS)) {
        let sql = spell(
            connection,
            format!(
                "INSERT INTO leases ({}) VALUES {}",
                LEASE_COLUMNS.replace("l.", ""),
                placeholder_rows(chunk.len(), COLUMNS)
            ),
        );
        let mut insert = sqlx::query(&sql);
        for lease in chunk {
            insert = insert
                .bind(lease.id.as_str())
                .bind(lease.task_id.as_str())
                .bind(lease.scope.as_str())
                .bind(lease.kind.as_str())
                .bind(&lease.audience)
                .bind(lease.state.as_str())
                .bind(lease.kid.as_deref())
                .bind(lease.window.issued_at.0)
                .bind(lease.window.expires_at.0)
                .bind(lease.window.renewable_until.0)
                .bind(lease.ended_at.map(|at| at.0));
        }
        insert.execute(&mut *connection).await?;
    }
    Ok(())
}

async fn renew(
    connection: &mut AnyConnection,
    id: &LeaseId,
    window: LeaseWindow,
    kid: &str,
    now: UnixMillis,
) -> Result<RenewalOutcome> {
    let renewed = sqlx::query(
        "UPDATE leases SET issued_at = $1, expires_at = $2, kid = $3 \
         WHERE id = $4 AND state = 'issued' AND expires_at > $5",
    )
    .bind(window.issued_at.0)
    .bind(window.expires_at.0)
    .bind(kid)
    .bind(id.as_str())
    .bind(now.0)
    .execute(&mut *connection)
    .await?;
    Ok(if renewed.rows_affected() == 1 {
        RenewalOutcome::Renewed
    } else {
        RenewalOutcome::NotRenewable
    })
}

/// Ends an active task of `workload_id` and its issued leases; returns the feed events to
/// append (one per lease, then one for the task), or `None` when the task was not active.
async fn complete(
    connection: &mut AnyConnection,
    task_id: &TaskId,
    workload_id: &str,
    now: UnixMillis,
) -> Result<Option<Vec<FeedEvent>>> {
    let ended = sqlx::query(
        "UPDATE tasks SET state = 'completed', ended_at = $1 \
         WHERE id = $2 AND workload_id = $3 AND state = 'active' RETURNING deadline",
    )
    .bind(now.0)
    .bind(task_id.as_str())
    .bind(workload_id)
    .fetch_optional(&mut *connection)
    .await?;
    let Some(ended) = ended else { return Ok(None) };
    let deadline = UnixMillis(ended.try_get("deadline")?);
    let events = end_task(
        connection,
        task_id.as_str(),
        deadline,
        LeaseState::Revoked,
        RevocationReason::TaskCompleted,
        now,
    )
    .await?;
    Ok(Some(events))
}

#[cfg(test)]
mod tests {
    //! Batch semantics that concurrent requests rely on. On a current-thread runtime, writes
    //! submitted together in one `join!` reach the committer before it runs, so they share one
    //! batch deterministically.

    use std::time::Duration;

    use super::super::{NewLeaseOutcome, Store};
    use crate::audit::AuditEvent;
    use crate::domain::task::LeaseWindow;
    use crate::domain::{
        CredentialKind, LeaseId, LeaseState, ScopeName, TaskContext, TaskId, TaskState, UnixMillis,
    };
    use crate::store::{CompletionOutcome, LeaseRecord, TaskRecord};

    const WORKLOAD: &str = "wl-batch";

    async fn store(directory: &tempfile::TempDir) -> Store {
        let url = format!("sqlite://{}/batch.db?mode=rwc", directory.path().display());
        let store = Store::connect(&url).await.expect("open store");
        sqlx::query(
            "INSERT INTO workloads (id, name, spiffe_id, roles, created_at) \
             VALUES ('wl-batch', 'agent', 'spiffe://test/agent', 'agent', 0)",
        )
        .execute(&store.writer)
        .await
        .expect("insert workload");
        store
    }

    fn task(now: UnixMillis, idempotency_key: Option<&str>) -> TaskRecord {
        TaskRecord {
            id: TaskId::generate(now),
            workload_id: WORKLOAD.to_owned(),
            purpose: "batch test".to_owned(),
            context: TaskContext::default(),
            state: TaskState::Active,
            created_at: now,
            deadline: now.plus(Duration::from_secs(600)),
            ended_at: None,
            idempotency_key: idempotency_key.map(str::to_owned),
            request_digest: idempotency_key.map(|_| "digest".to_owned()),
        }
    }

    fn lease(task: &TaskRecord, now: UnixMillis) -> LeaseRecord {
        LeaseRecord {
            id: LeaseId::generate(now),
            task_id: task.id.clone(),
            scope: ScopeName::parse("scope", "tickets.read").expect("scope"),
            kind: CredentialKind::Jwt,
            audience: "https://tickets.example".to_owned(),
            state: LeaseState::Issued,
            kid: Some("kid".to_owned()),
            window: LeaseWindow {
                issued_at: now,
                expires_at: now.plus(Duration::from_secs(300)),
                renewable_until: now.plus(Duration::from_secs(600)),
            },
            ended_at: None,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_completion_sweeps_a_lease_its_batch_adds_to_the_task() {
        let directory = tempfile::tempdir().expect("tempdir");
        let store = store(&directory).await;
        let now = UnixMillis::now();
        let task = task(now, None);
        assert!(store.insert_task(&task, &[], &[]).await.expect("insert"));
        let late = lease(&task, now);
        // The completion arrives first; the lease must not outlive it either way.
        let (completion, added) = tokio::join!(
            store.complete_task(&task.id, WORKLOAD, now, "agent"),
            store.add_lease(WORKLOAD, &late, now, &[]),
        );
        assert_eq!(added.expect("add"), NewLeaseOutcome::Added);
        let CompletionOutcome::Completed { revoked, .. } = completion.expect("complete") else {
            panic!("the task was active");
        };
        assert_eq!(revoked.len(), 1, "the completion revokes the lease");
        assert_eq!(revoked[0].id, late.id);
        let stored = store.leases_of_task(&task.id).await.expect("leases");
        assert_eq!(stored[0].state, LeaseState::Revoked);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_idempotency_key_in_one_batch_stores_one_task() {
        let directory = tempfile::tempdir().expect("tempdir");
        let store = store(&directory).await;
        let now = UnixMillis::now();
        let (first, second) = (task(now, Some("key-1")), task(now, Some("key-1")));
        let (first_leases, second_leases) = ([lease(&first, now)], [lease(&second, now)]);
        let (first_inserted, second_inserted) = tokio::join!(
            store.insert_task(&first, &first_leases, &[]),
            store.insert_task(&second, &second_leases, &[]),
        );
        assert!(first_inserted.expect("first"));
        assert!(!second_inserted.expect("second"));
        assert!(
            store
                .leases_of_task(&second.id)
                .await
                .expect("leases")
                .is_empty()
        );
        assert_eq!(
            store.leases_of_task(&first.id).await.expect("leases").len(),
            1
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failing_write_fails_alone_and_its_batch_still_commits() {
        let directory = tempfile::tempdir().expect("tempdir");
        let store = store(&directory).await;
        let now = UnixMillis::now();
        let recorded = AuditEvent::new("test.recorded", "ok", "agent");
        store
            .record_events(std::slice::from_ref(&recorded))
            .await
            .expect("first record");
        let good = task(now, None);
        let good_leases = [lease(&good, now)];
        // The same event id again violates the primary key: only that write may fail.
        let (duplicate, inserted) = tokio::join!(
            store.record_events(std::slice::from_ref(&recorded)),
            store.insert_task(&good, &good_leases, &[]),
        );
        assert!(duplicate.is_err(), "a duplicate event id is refused");
        assert!(inserted.expect("the other write succeeds"));
        assert_eq!(
            store.leases_of_task(&good.id).await.expect("leases").len(),
            1
        );
    }
}
