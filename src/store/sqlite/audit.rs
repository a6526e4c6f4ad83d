//! The audit trail on SQLite: events chained as they are written, checkpoints, and queries.
//!
//! SQLite has one writer, so the order transactions commit in is the order they run in: an event
//! is numbered and hashed in the transaction that inserts it, onto the head the writer thread
//! keeps in memory. There is nothing left for a sealer to do, except for events written by
//! versions that did not chain on write, which [`seal_leftovers`] chains when the store opens.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::writer::Write;
use crate::audit::AuditEvent;
use crate::audit::chain::{SealedEvent, event_hash};
use crate::domain::UnixMillis;
use crate::error::Result;
use crate::store::events::{TaskOwners, audit_row, tasks_needing_owner};
use crate::store::records::{AuditFilter, AuditRecord, Checkpoint};

/// The last chained position and its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditHead {
    pub seq: i64,
    pub hash: String,
}

const EVENT_COLUMNS: &str = "seq, id, occurred_at, event_type, outcome, actor, workload, task_id, scope, \
     lease_id, detail_json, context_json, prev_hash, hash";

pub fn read_head(connection: &Connection) -> Result<AuditHead> {
    Ok(connection
        .prepare_cached("SELECT last_seq, last_hash FROM audit_head WHERE id = 1")?
        .query_row([], |row| {
            Ok(AuditHead {
                seq: row.get(0)?,
                hash: row.get(1)?,
            })
        })?)
}

pub fn write_head(connection: &Connection, head: &AuditHead) -> Result<()> {
    connection
        .prepare_cached("UPDATE audit_head SET last_seq = ?1, last_hash = ?2 WHERE id = 1")?
        .execute(params![head.seq, head.hash])?;
    Ok(())
}

/// Writes `events` in the current write, chained onto its head. An event about a task that
/// names no workload or context takes the task's owner and context.
pub fn insert_events(write: &mut Write<'_>, events: &[AuditEvent]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let owners = task_owners(write.connection, tasks_needing_owner(events))?;
    let mut insert = write.connection.prepare_cached(&format!(
        "INSERT INTO audit_events ({EVENT_COLUMNS}) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
    ))?;
    for event in events {
        let mut row = audit_row(event, &owners);
        chain(&mut write.head, &mut row);
        insert.execute(params![
            row.seq,
            row.id,
            row.occurred_at,
            row.event_type,
            row.outcome,
            row.actor,
            row.workload,
            row.task_id,
            row.scope,
            row.lease_id,
            row.detail_json,
            row.context_json,
            row.prev_hash,
            row.hash,
        ])?;
    }
    Ok(())
}

/// Numbers `row` after `head`, links and hashes it, and moves `head` onto it.
fn chain(head: &mut AuditHead, row: &mut SealedEvent) {
    row.seq = head.seq + 1;
    row.prev_hash = std::mem::take(&mut head.hash);
    row.hash = event_hash(row);
    head.seq = row.seq;
    head.hash.clone_from(&row.hash);
}

/// Owner name and context of `tasks`, read in the writing transaction (so a task inserted by
/// the same batch is found).
fn task_owners(connection: &Connection, tasks: Vec<&str>) -> Result<TaskOwners> {
    let mut owners = TaskOwners::with_capacity(tasks.len());
    if tasks.is_empty() {
        return Ok(owners);
    }
    let mut select = connection.prepare_cached(
        "SELECT w.name, t.context_json FROM tasks t JOIN workloads w ON w.id = t.workload_id \
         WHERE t.id = ?1",
    )?;
    for task in tasks {
        if let Some(owner) = select
            .query_row([task], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?
        {
            owners.insert(task.to_owned(), owner);
        }
    }
    Ok(owners)
}

/// Chains events that versions before chaining-on-write left unsealed, oldest id first.
pub fn seal_leftovers(connection: &mut Connection) -> Result<usize> {
    let transaction = connection.transaction()?;
    let mut head = read_head(&transaction)?;
    let leftovers: Vec<SealedEvent> = transaction
        .prepare(&format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events WHERE seq IS NULL ORDER BY id"
        ))?
        .query_map([], |row| sealed_event(row).map(|record| record.event))?
        .collect::<Result<_, _>>()?;
    {
        let mut update = transaction
            .prepare("UPDATE audit_events SET seq = ?1, prev_hash = ?2, hash = ?3 WHERE id = ?4")?;
        for mut event in leftovers.iter().cloned() {
            chain(&mut head, &mut event);
            update.execute(params![event.seq, event.prev_hash, event.hash, event.id])?;
        }
    }
    if !leftovers.is_empty() {
        write_head(&transaction, &head)?;
    }
    transaction.commit()?;
    Ok(leftovers.len())
}

pub fn checkpoints(connection: &Connection) -> Result<Vec<Checkpoint>> {
    Ok(connection
        .prepare_cached(
            "SELECT seq, head_hash, kid, signature FROM audit_checkpoints ORDER BY seq",
        )?
        .query_map([], |row| {
            Ok(Checkpoint {
                seq: row.get(0)?,
                head_hash: row.get(1)?,
                kid: row.get(2)?,
                signature: row.get(3)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}

pub fn insert_checkpoint(
    write: &Write<'_>,
    checkpoint: &Checkpoint,
    now: UnixMillis,
) -> Result<()> {
    write
        .connection
        .prepare_cached(
            "INSERT INTO audit_checkpoints (seq, head_hash, kid, signature, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            checkpoint.seq,
            checkpoint.head_hash,
            checkpoint.kid,
            checkpoint.signature,
            now.0
        ])?;
    Ok(())
}

pub fn sealed_events(
    connection: &Connection,
    after_seq: i64,
    limit: usize,
) -> Result<Vec<AuditRecord>> {
    Ok(connection
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))?
        .query_map(params![after_seq, limit as i64], sealed_event)?
        .collect::<Result<_, _>>()?)
}

pub fn unsealed_count(connection: &Connection) -> Result<i64> {
    Ok(connection
        .prepare_cached("SELECT COUNT(*) FROM audit_events WHERE seq IS NULL")?
        .query_row([], |row| row.get(0))?)
}

pub fn query(connection: &Connection, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
    Ok(connection
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events \
             WHERE (?1 IS NULL OR task_id = ?1) AND (?2 IS NULL OR workload = ?2 OR actor = ?2) \
             AND (?3 IS NULL OR scope = ?3) AND (?4 IS NULL OR event_type = ?4) \
             AND (?5 IS NULL OR occurred_at >= ?5) AND (?6 IS NULL OR occurred_at < ?6) \
             ORDER BY occurred_at, id LIMIT ?7"
        ))?
        .query_map(
            params![
                filter.task_id,
                filter.workload,
                filter.scope,
                filter.event_type,
                filter.since.map(|at| at.0),
                filter.until.map(|at| at.0),
                filter.limit
            ],
            sealed_event,
        )?
        .collect::<Result<_, _>>()?)
}

fn sealed_event(row: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    let seq: Option<i64> = row.get(0)?;
    Ok(AuditRecord {
        seq,
        event: SealedEvent {
            seq: seq.unwrap_or_default(),
            id: row.get(1)?,
            occurred_at: row.get(2)?,
            event_type: row.get(3)?,
            outcome: row.get(4)?,
            actor: row.get(5)?,
            workload: row.get(6)?,
            task_id: row.get(7)?,
            scope: row.get(8)?,
            lease_id: row.get(9)?,
            detail_json: row.get(10)?,
            context_json: row.get(11)?,
            prev_hash: row.get::<_, Option<String>>(12)?.unwrap_or_default(),
            hash: row.get::<_, Option<String>>(13)?.unwrap_or_default(),
        },
    })
}
