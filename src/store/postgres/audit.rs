//! The audit trail on PostgreSQL: events inserted unsealed, chained afterwards by the sealer
//! into an insert-only chain table.
//!
//! Several replicas (and several committers in each) write events at once, so the order
//! transactions commit in is only known afterwards. Each event row carries its transaction's id
//! and a position from a sequence; the chain order is (transaction id, position), read only
//! below the oldest transaction still running, where it can no longer change. The sealer hashes
//! events in that order and inserts one small chain row per event, after claiming the chain head
//! with an update guarded by the head it read (a sealer on another replica that moved it first
//! wins; the loser writes nothing and tries again at its next round).

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use crate::audit::AuditEvent;
use crate::audit::chain::{SealedEvent, event_hash};
use crate::domain::UnixMillis;
use crate::error::Result;
use crate::store::events::{TaskOwners, audit_row, tasks_needing_owner};
use crate::store::records::{AuditFilter, AuditRecord, Checkpoint};

/// The event columns audit reads select, in the order [`event_columns`] decodes them.
macro_rules! event_columns {
    () => {
        "e.id, e.occurred_at, e.event_type, e.outcome, e.actor, e.workload, e.task_id, e.scope, \
         e.lease_id, e.detail_json, e.context_json"
    };
}

/// Writes `events` in the caller's transaction, all in one statement. Events that name a task
/// but not its owner or context take them from the task.
pub async fn insert_events(connection: &mut PgConnection, events: &[&AuditEvent]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let owners = task_owners(connection, tasks_needing_owner(events.iter().copied())).await?;
    let rows: Vec<SealedEvent> = events
        .iter()
        .map(|event| audit_row(event, &owners))
        .collect();
    let column = |pick: fn(&SealedEvent) -> String| rows.iter().map(pick).collect::<Vec<_>>();
    let optional =
        |pick: fn(&SealedEvent) -> Option<String>| rows.iter().map(pick).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO audit_events (id, occurred_at, event_type, outcome, actor, workload, task_id, \
         scope, lease_id, detail_json, context_json) \
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::text[], $8::text[], $9::text[], $10::text[], $11::text[])",
    )
    .bind(column(|row| row.id.clone()))
    .bind(rows.iter().map(|row| row.occurred_at).collect::<Vec<_>>())
    .bind(column(|row| row.event_type.clone()))
    .bind(column(|row| row.outcome.clone()))
    .bind(column(|row| row.actor.clone()))
    .bind(optional(|row| row.workload.clone()))
    .bind(optional(|row| row.task_id.clone()))
    .bind(optional(|row| row.scope.clone()))
    .bind(optional(|row| row.lease_id.clone()))
    .bind(column(|row| row.detail_json.clone()))
    .bind(optional(|row| row.context_json.clone()))
    .execute(connection)
    .await?;
    Ok(())
}

/// Owner name and context of `tasks`, read in the writing transaction (so a task inserted by it
/// is found), in one statement.
async fn task_owners(connection: &mut PgConnection, tasks: Vec<&str>) -> Result<TaskOwners> {
    let mut owners = TaskOwners::with_capacity(tasks.len());
    if tasks.is_empty() {
        return Ok(owners);
    }
    let rows = sqlx::query(
        "SELECT t.id, w.name, t.context_json FROM tasks t JOIN workloads w ON w.id = t.workload_id \
         WHERE t.id = ANY($1)",
    )
    .bind(tasks)
    .fetch_all(connection)
    .await?;
    for row in rows {
        owners.insert(row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?));
    }
    Ok(owners)
}

/// The chain head: last sealed position and hash, and the (transaction, position) of the last
/// sealed event.
struct Head {
    seq: i64,
    hash: String,
    tx_id: i64,
    pos: i64,
}

async fn read_head(pool: &PgPool) -> Result<Head> {
    let row =
        sqlx::query("SELECT last_seq, last_hash, last_tx, last_pos FROM audit_head WHERE id = 1")
            .fetch_one(pool)
            .await?;
    Ok(Head {
        seq: row.try_get(0)?,
        hash: row.try_get(1)?,
        tx_id: row.try_get(2)?,
        pos: row.try_get(3)?,
    })
}

pub async fn head(pool: &PgPool) -> Result<(i64, String)> {
    let head = read_head(pool).await?;
    Ok((head.seq, head.hash))
}

/// Chains up to `limit` events below the horizon after the head; returns how many.
pub async fn seal(pool: &PgPool, limit: usize) -> Result<usize> {
    let head = read_head(pool).await?;
    let rows = sqlx::query(concat!(
        "SELECT ",
        event_columns!(),
        ", e.tx_id, e.pos, h.horizon FROM audit_events e, (SELECT ",
        horizon!(),
        " AS horizon) h WHERE (e.tx_id, e.pos) > ($1, $2) ORDER BY e.tx_id, e.pos LIMIT $3"
    ))
    .bind(head.tx_id)
    .bind(head.pos)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    let (mut seq, mut previous_hash) = (head.seq, head.hash.clone());
    let (mut last_tx, mut last_pos) = (head.tx_id, head.pos);
    let mut sealed = Vec::with_capacity(rows.len());
    for row in &rows {
        let (tx_id, pos, horizon): (i64, i64, i64) =
            (row.try_get(11)?, row.try_get(12)?, row.try_get(13)?);
        if tx_id >= horizon {
            // Committed, but an older transaction is still running: its events may come first.
            break;
        }
        let mut event = event_columns(row, 0)?;
        seq += 1;
        event.seq = seq;
        event.prev_hash = std::mem::take(&mut previous_hash);
        event.hash = event_hash(&event);
        previous_hash.clone_from(&event.hash);
        (last_tx, last_pos) = (tx_id, pos);
        sealed.push(event);
    }
    if sealed.is_empty() {
        return Ok(0);
    }
    // One statement claims the head and inserts the chain rows: a sealing holds a transaction
    // id only while it executes, so it never holds the horizon (and the feed) back for longer.
    let inserted = sqlx::query(
        "WITH claimed AS (UPDATE audit_head SET last_seq = $1, last_hash = $2, last_tx = $3, last_pos = $4 \
         WHERE id = 1 AND last_seq = $5 RETURNING id) \
         INSERT INTO audit_chain (seq, event_id, prev_hash, hash) \
         SELECT * FROM UNNEST($6::bigint[], $7::text[], $8::text[], $9::text[]) WHERE EXISTS (SELECT 1 FROM claimed)",
    )
    .bind(seq)
    .bind(&previous_hash)
    .bind(last_tx)
    .bind(last_pos)
    .bind(head.seq)
    .bind(sealed.iter().map(|event| event.seq).collect::<Vec<_>>())
    .bind(sealed.iter().map(|event| event.id.clone()).collect::<Vec<_>>())
    .bind(sealed.iter().map(|event| event.prev_hash.clone()).collect::<Vec<_>>())
    .bind(sealed.iter().map(|event| event.hash.clone()).collect::<Vec<_>>())
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 0 {
        // Another sealer moved the head first: nothing written, the events wait for next round.
        return Ok(0);
    }
    Ok(sealed.len())
}

pub async fn unsealed_count(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query(
        "SELECT COUNT(*) FROM audit_events e, audit_head h \
         WHERE h.id = 1 AND (e.tx_id, e.pos) > (h.last_tx, h.last_pos)",
    )
    .fetch_one(pool)
    .await?
    .try_get(0)?)
}

pub async fn sealed_events(
    pool: &PgPool,
    after_seq: i64,
    limit: usize,
) -> Result<Vec<AuditRecord>> {
    sqlx::query(concat!(
        "SELECT ",
        event_columns!(),
        ", c.seq, c.prev_hash, c.hash FROM audit_chain c \
         JOIN audit_events e ON e.id = c.event_id WHERE c.seq > $1 ORDER BY c.seq LIMIT $2"
    ))
    .bind(after_seq)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?
    .iter()
    .map(chained_record)
    .collect()
}

pub async fn query(pool: &PgPool, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
    sqlx::query(concat!(
        "SELECT ",
        event_columns!(),
        ", c.seq, c.prev_hash, c.hash FROM audit_events e \
         LEFT JOIN audit_chain c ON c.event_id = e.id \
         WHERE ($1::text IS NULL OR e.task_id = $1) \
         AND ($2::text IS NULL OR e.workload = $2 OR e.actor = $2) \
         AND ($3::text IS NULL OR e.scope = $3) AND ($4::text IS NULL OR e.event_type = $4) \
         AND ($5::bigint IS NULL OR e.occurred_at >= $5) AND ($6::bigint IS NULL OR e.occurred_at < $6) \
         ORDER BY e.occurred_at, e.id LIMIT $7"
    ))
    .bind(filter.task_id.as_deref())
    .bind(filter.workload.as_deref())
    .bind(filter.scope.as_deref())
    .bind(filter.event_type.as_deref())
    .bind(filter.since.map(|at| at.0))
    .bind(filter.until.map(|at| at.0))
    .bind(filter.limit)
    .fetch_all(pool)
    .await?
    .iter()
    .map(chained_record)
    .collect()
}

pub async fn checkpoints(pool: &PgPool) -> Result<Vec<Checkpoint>> {
    sqlx::query("SELECT seq, head_hash, kid, signature FROM audit_checkpoints ORDER BY seq")
        .fetch_all(pool)
        .await?
        .iter()
        .map(|row| {
            Ok(Checkpoint {
                seq: row.try_get(0)?,
                head_hash: row.try_get(1)?,
                kid: row.try_get(2)?,
                signature: row.try_get(3)?,
            })
        })
        .collect()
}

pub async fn insert_checkpoint(
    pool: &PgPool,
    checkpoint: &Checkpoint,
    now: UnixMillis,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_checkpoints (seq, head_hash, kid, signature, created_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(checkpoint.seq)
    .bind(&checkpoint.head_hash)
    .bind(&checkpoint.kid)
    .bind(&checkpoint.signature)
    .bind(now.0)
    .execute(pool)
    .await?;
    Ok(())
}

/// An event's columns from `event_columns!()` starting at column `first`, unsealed.
fn event_columns(row: &PgRow, first: usize) -> Result<SealedEvent> {
    Ok(SealedEvent {
        seq: 0,
        id: row.try_get(first)?,
        occurred_at: row.try_get(first + 1)?,
        event_type: row.try_get(first + 2)?,
        outcome: row.try_get(first + 3)?,
        actor: row.try_get(first + 4)?,
        workload: row.try_get(first + 5)?,
        task_id: row.try_get(first + 6)?,
        scope: row.try_get(first + 7)?,
        lease_id: row.try_get(first + 8)?,
        detail_json: row.try_get(first + 9)?,
        context_json: row.try_get(first + 10)?,
        prev_hash: String::new(),
        hash: String::new(),
    })
}

/// An event followed by its (possibly absent) chain columns `seq, prev_hash, hash`.
fn chained_record(row: &PgRow) -> Result<AuditRecord> {
    let mut event = event_columns(row, 0)?;
    let seq: Option<i64> = row.try_get(11)?;
    event.seq = seq.unwrap_or_default();
    event.prev_hash = row.try_get::<Option<String>, _>(12)?.unwrap_or_default();
    event.hash = row.try_get::<Option<String>, _>(13)?.unwrap_or_default();
    Ok(AuditRecord { seq, event })
}
