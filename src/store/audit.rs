//! The audit tables: events written inside the transactions of the actions they record (and
//! chained there on SQLite), the sealing that numbers and chains them on PostgreSQL,
//! checkpoints, and reads for investigation.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};

use sqlx::Row;
use sqlx::any::AnyRow;

use super::Store;
use super::batch::{Outcome, Write, unexpected};
use super::sql::{is_sqlite, placeholder_rows, rows_per_statement, spell};
use crate::audit::AuditEvent;
use crate::audit::chain::{SealedEvent, event_hash};
use crate::domain::UnixMillis;
use crate::error::{Error, Result};

/// Events sealed per `UPDATE` statement (4 parameters each, well inside both databases' limits).
const SEAL_UPDATE_ROWS: usize = 500;

const EVENT_COLUMNS: &str = "seq, id, occurred_at, event_type, outcome, actor, workload, task_id, scope, lease_id, \
     detail_json, context_json, prev_hash, hash";

/// An event as stored; `seq`, `prev_hash` and `hash` are empty until it is sealed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: Option<i64>,
    pub event: SealedEvent,
}

/// A signed checkpoint of the chain head.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub seq: i64,
    pub head_hash: String,
    pub kid: String,
    pub signature: Vec<u8>,
}

/// Which events an investigation wants; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub task_id: Option<String>,
    pub workload: Option<String>,
    pub scope: Option<String>,
    pub event_type: Option<String>,
    pub since: Option<UnixMillis>,
    pub until: Option<UnixMillis>,
    pub limit: i64,
}

impl Store {
    /// Writes events that record no other change (refusals, introspections) in a (shared)
    /// transaction of their own.
    pub async fn record_events(&self, events: &[AuditEvent]) -> Result<()> {
        match self
            .committer
            .submit(Write::Events(events.to_vec()))
            .await?
        {
            Outcome::Stored => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Numbers and chains up to `limit` unsealed events, oldest id first. Returns how many it
    /// sealed. On SQLite only events written by versions that did not chain on write are left
    /// for it.
    ///
    /// The events are read and hashed before any write: on SQLite the one writer connection is
    /// what every issuance waits for, and reading and hashing a thousand events on it held
    /// issuance up for tens of milliseconds. The write then claims the head with a guarded
    /// update: if another sealer (another replica) moved the head since it was read, nothing is
    /// written and the events are left to the next round. On PostgreSQL that update's row lock
    /// makes concurrent sealers take turns.
    pub async fn seal_audit_events(&self, limit: i64) -> Result<usize> {
        let (head_seq, head_hash) = self.audit_head().await?;
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events WHERE seq IS NULL ORDER BY id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let (mut seq, mut previous_hash) = (head_seq, head_hash);
        let mut sealed = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut event = audit_record(row)?.event;
            seq += 1;
            event.seq = seq;
            event.prev_hash = previous_hash;
            event.hash = event_hash(&event);
            previous_hash = event.hash.clone();
            sealed.push(event);
        }
        let mut tx = self.writer.begin().await?;
        if !is_sqlite(&tx) {
            // PostgreSQL plans the `UPDATE ... FROM (VALUES ..)` below as a hash join over a
            // sequential scan of every event until the table holds about 100k rows (or longer,
            // while its statistics lag behind its growth): a full scan per round of 500.
            sqlx::query("SET LOCAL enable_seqscan = off")
                .execute(&mut *tx)
                .await?;
        }
        let claimed = sqlx::query(
            "UPDATE audit_head SET last_seq = $1, last_hash = $2 WHERE id = 1 AND last_seq = $3",
        )
        .bind(seq)
        .bind(&previous_hash)
        .bind(head_seq)
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() == 0 {
            return Ok(0);
        }
        for chunk in sealed.chunks(SEAL_UPDATE_ROWS) {
            // One statement per chunk: VALUES columns are column1.. on both backends. (No `seq IS
            // NULL` filter: SQLite would drive the join from the unsealed-events index and scan
            // the VALUES for each; the claimed head already rules out a second sealer.)
            let sql = spell(
                &tx,
                format!(
                    "UPDATE audit_events SET seq = v.column2, prev_hash = v.column3, hash = v.column4 \
                     FROM (VALUES {}) AS v WHERE audit_events.id = v.column1",
                    placeholder_rows(chunk.len(), 4)
                ),
            );
            let mut update = sqlx::query(&sql);
            for event in chunk {
                update = update
                    .bind(&event.id)
                    .bind(event.seq)
                    .bind(&event.prev_hash)
                    .bind(&event.hash);
            }
            update.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    /// The last sealed position and its hash.
    pub async fn audit_head(&self) -> Result<(i64, String)> {
        read_head(&self.reader).await
    }

    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let rows = sqlx::query(
            "SELECT seq, head_hash, kid, signature FROM audit_checkpoints ORDER BY seq",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Checkpoint {
                    seq: row.try_get("seq")?,
                    head_hash: row.try_get("head_hash")?,
                    kid: row.try_get("kid")?,
                    signature: row.try_get("signature")?,
                })
            })
            .collect()
    }

    /// Stores a checkpoint; a checkpoint another replica made of the same position is kept.
    pub async fn insert_checkpoint(&self, checkpoint: &Checkpoint, now: UnixMillis) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_checkpoints (seq, head_hash, kid, signature, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT DO NOTHING",
        )
        .bind(checkpoint.seq)
        .bind(&checkpoint.head_hash)
        .bind(&checkpoint.kid)
        .bind(&checkpoint.signature)
        .bind(now.0)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Up to `limit` sealed events after `after_seq`, in chain order.
    pub async fn sealed_audit_events(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(audit_record).collect()
    }

    /// How many events await sealing.
    pub async fn unsealed_audit_events(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM audit_events WHERE seq IS NULL")
            .fetch_one(&self.reader)
            .await?;
        Ok(row.try_get("n")?)
    }

    /// Events matching `filter`, in the order they happened (sealed or not).
    pub async fn query_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events \
             WHERE ($1 IS NULL OR task_id = $1) AND ($2 IS NULL OR workload = $2 OR actor = $2) \
             AND ($3 IS NULL OR scope = $3) AND ($4 IS NULL OR event_type = $4) \
             AND ($5 IS NULL OR occurred_at >= $5) AND ($6 IS NULL OR occurred_at < $6) \
             ORDER BY occurred_at, id LIMIT $7"
        ))
        .bind(filter.task_id.as_deref())
        .bind(filter.workload.as_deref())
        .bind(filter.scope.as_deref())
        .bind(filter.event_type.as_deref())
        .bind(filter.since.map(|at| at.0))
        .bind(filter.until.map(|at| at.0))
        .bind(filter.limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(audit_record).collect()
    }
}

/// Writes `events` inside the caller's transaction, many per statement, chained on SQLite. An
/// event about a task that names no workload or context takes the task's owner and context.
pub(super) async fn insert_events<E: Borrow<AuditEvent>>(
    connection: &mut sqlx::AnyConnection,
    events: &[E],
) -> Result<()> {
    let events: Vec<&AuditEvent> = events.iter().map(Borrow::borrow).collect();
    if events.is_empty() {
        return Ok(());
    }
    let owners = task_owners(connection, &events).await?;
    // SQLite has one writer, so the order transactions commit in is the order they run in: the
    // events can be chained as they are written, which spares the sealer reading and rewriting
    // every row (a third of issuance throughput). With several writers (PostgreSQL replicas and
    // committers) commit order is only known afterwards, and the sealer chains them.
    let mut head = if is_sqlite(connection) {
        Some(read_head(&mut *connection).await?)
    } else {
        None
    };
    let mut rows = Vec::with_capacity(events.len());
    for event in events {
        let owner = event.task_id.as_ref().and_then(|task| owners.get(task));
        let context_json = match &event.context {
            Some(context) => Some(serde_json::to_string(context).map_err(Error::internal)?),
            None => owner.map(|(_, context)| context.clone()),
        };
        let mut row = SealedEvent {
            seq: 0,
            id: event.id.clone(),
            occurred_at: event.occurred_at.0,
            event_type: event.event_type.to_owned(),
            outcome: event.outcome.to_owned(),
            actor: event.actor.clone(),
            workload: event
                .workload
                .clone()
                .or_else(|| owner.map(|(name, _)| name.clone())),
            task_id: event.task_id.clone(),
            scope: event.scope.clone(),
            lease_id: event.lease_id.clone(),
            detail_json: event.detail.to_string(),
            context_json,
            prev_hash: String::new(),
            hash: String::new(),
        };
        if let Some((seq, previous_hash)) = &mut head {
            *seq += 1;
            row.seq = *seq;
            row.prev_hash = std::mem::take(previous_hash);
            row.hash = event_hash(&row);
            previous_hash.clone_from(&row.hash);
        }
        rows.push(row);
    }
    let sealed = head.is_some();
    const COLUMNS: usize = 14;
    for chunk in rows.chunks(rows_per_statement(COLUMNS)) {
        let sql = spell(
            connection,
            format!(
                "INSERT INTO audit_events ({EVENT_COLUMNS}) VALUES {}",
                placeholder_rows(chunk.len(), COLUMNS)
            ),
        );
        let mut insert = sqlx::query(&sql);
        for row in chunk {
            insert = insert
                .bind(sealed.then_some(row.seq))
                .bind(&row.id)
                .bind(row.occurred_at)
                .bind(&row.event_type)
                .bind(&row.outcome)
                .bind(&row.actor)
                .bind(row.workload.as_deref())
                .bind(row.task_id.as_deref())
                .bind(row.scope.as_deref())
                .bind(row.lease_id.as_deref())
                .bind(&row.detail_json)
                .bind(row.context_json.as_deref())
                .bind(sealed.then_some(row.prev_hash.as_str()))
                .bind(sealed.then_some(row.hash.as_str()));
        }
        insert.execute(&mut *connection).await?;
    }
    if let Some((seq, hash)) = head {
        sqlx::query("UPDATE audit_head SET last_seq = ?, last_hash = ? WHERE id = 1")
            .bind(seq)
            .bind(hash)
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

/// The last sealed position and its hash, as `executor` sees them.
async fn read_head<'c>(executor: impl sqlx::AnyExecutor<'c>) -> Result<(i64, String)> {
    let row = sqlx::query("SELECT last_seq, last_hash FROM audit_head WHERE id = 1")
        .fetch_one(executor)
        .await?;
    Ok((row.try_get("last_seq")?, row.try_get("last_hash")?))
}

/// Owner name and context (JSON) of the tasks that `events` name without saying them, read in
/// one statement inside the writing transaction (so a task inserted by it is found). A per-row
/// sub-select did the same at a cost: PostgreSQL planned every sub-select of every statement.
async fn task_owners(
    connection: &mut sqlx::AnyConnection,
    events: &[&AuditEvent],
) -> Result<HashMap<String, (String, String)>> {
    let wanted: HashSet<&str> = events
        .iter()
        .filter(|event| event.workload.is_none() || event.context.is_none())
        .filter_map(|event| event.task_id.as_deref())
        .collect();
    let wanted: Vec<&str> = wanted.into_iter().collect();
    let mut owners = HashMap::with_capacity(wanted.len());
    for chunk in wanted.chunks(rows_per_statement(1)) {
        let sql = spell(
            connection,
            format!(
                "SELECT t.id, w.name, t.context_json FROM tasks t JOIN workloads w ON w.id = t.workload_id \
                 WHERE t.id IN ({})",
                vec!["?"; chunk.len()].join(", ")
            ),
        );
        let mut select = sqlx::query(&sql);
        for task_id in chunk {
            select = select.bind(*task_id);
        }
        for row in select.fetch_all(&mut *connection).await? {
            owners.insert(
                row.try_get("id")?,
                (row.try_get("name")?, row.try_get("context_json")?),
            );
        }
    }
    Ok(owners)
}

fn audit_record(row: &AnyRow) -> Result<AuditRecord> {
    let seq: Option<i64> = row.try_get("seq")?;
    Ok(AuditRecord {
        seq,
        event: SealedEvent {
            seq: seq.unwrap_or_default(),
            id: row.try_get("id")?,
            occurred_at: row.try_get("occurred_at")?,
            event_type: row.try_get("event_type")?,
            outcome: row.try_get("outcome")?,
            actor: row.try_get("actor")?,
            workload: row.try_get("workload")?,
            task_id: row.try_get("task_id")?,
            scope: row.try_get("scope")?,
            lease_id: row.try_get("lease_id")?,
            detail_json: row.try_get("detail_json")?,
            context_json: row.try_get("context_json")?,
            prev_hash: row
                .try_get::<Option<String>, _>("prev_hash")?
                .unwrap_or_default(),
            hash: row
                .try_get::<Option<String>, _>("hash")?
                .unwrap_or_default(),
        },
    })
}
