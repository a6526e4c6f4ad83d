//! The durable job queue on SQLite. The one writer makes claims serial, so two runners can
//! never claim the same job.

use std::time::Duration;

use rusqlite::{Connection, Row, params};

use super::audit;
use super::writer::Write;
use crate::audit::AuditEvent;
use crate::domain::UnixMillis;
use crate::error::{Error, Result};
use crate::store::Topic;
use crate::store::jobs::{ClaimedJob, JobOutcome, JobRecord, NewJob, claim_token};

pub fn enqueue(write: &mut Write<'_>, jobs: &[NewJob], events: &[AuditEvent]) -> Result<()> {
    let mut insert = write.connection.prepare_cached(
        "INSERT INTO jobs (id, kind, payload_json, run_after, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let now = UnixMillis::now();
    for job in jobs {
        insert.execute(params![
            job.id,
            job.kind,
            job.payload.to_string(),
            job.run_after.0,
            now.0
        ])?;
    }
    drop(insert);
    audit::insert_events(write, events)?;
    write.topics.push(Topic::Jobs);
    Ok(())
}

pub fn claim(
    write: &mut Write<'_>,
    kinds: &[String],
    limit: usize,
    lock_for: Duration,
    now: UnixMillis,
) -> Result<Vec<ClaimedJob>> {
    let claim = claim_token();
    let claimed_until = now.plus(lock_for);
    let kinds = serde_json::to_string(kinds).map_err(Error::internal)?;
    write
        .connection
        .prepare_cached(
            "UPDATE jobs SET claim = ?1, claimed_until = ?2, attempts = attempts + 1 WHERE id IN \
             (SELECT id FROM jobs WHERE kind IN (SELECT value FROM json_each(?3)) AND run_after <= ?4 \
              AND (claimed_until IS NULL OR claimed_until <= ?4) ORDER BY run_after LIMIT ?5) \
             RETURNING id, kind, payload_json, attempts",
        )?
        .query_map(
            params![claim, claimed_until.0, kinds, now.0, limit as i64],
            |row| Ok((row.get::<_, String>(0)?, row.get(1)?, row.get::<_, String>(2)?, row.get::<_, u32>(3)?)),
        )?
        .map(|row| {
            let (id, kind, payload, attempts) = row?;
            Ok(ClaimedJob {
                id,
                kind,
                payload: serde_json::from_str(&payload)
                    .map_err(|_| crate::store::records::corrupt("jobs.payload_json", &payload))?,
                attempts,
                claim: claim.clone(),
                claimed_until,
            })
        })
        .collect()
}

pub fn extend(write: &mut Write<'_>, job: &ClaimedJob, until: UnixMillis) -> Result<bool> {
    Ok(write
        .connection
        .prepare_cached("UPDATE jobs SET claimed_until = ?1 WHERE id = ?2 AND claim = ?3")?
        .execute(params![until.0, job.id, job.claim])?
        == 1)
}

pub fn finish(write: &mut Write<'_>, job: &ClaimedJob, outcome: &JobOutcome) -> Result<bool> {
    let changed = match outcome {
        JobOutcome::Done => write
            .connection
            .prepare_cached("DELETE FROM jobs WHERE id = ?1 AND claim = ?2")?
            .execute(params![job.id, job.claim])?,
        JobOutcome::Failed { retry_at, error } => write
            .connection
            .prepare_cached(
                "UPDATE jobs SET claim = NULL, claimed_until = NULL, run_after = ?1, last_error = ?2 \
                 WHERE id = ?3 AND claim = ?4",
            )?
            .execute(params![retry_at.0, error, job.id, job.claim])?,
    };
    Ok(changed == 1)
}

pub fn pending(connection: &Connection, limit: usize) -> Result<Vec<JobRecord>> {
    connection
        .prepare_cached(
            "SELECT id, kind, payload_json, attempts, run_after, claimed_until, last_error, created_at \
             FROM jobs ORDER BY created_at, id LIMIT ?1",
        )?
        .query_map([limit as i64], job_row)?
        .map(|row| row?)
        .collect()
}

fn job_row(row: &Row<'_>) -> rusqlite::Result<Result<JobRecord>> {
    let payload: String = row.get(2)?;
    Ok(serde_json::from_str(&payload)
        .map_err(|_| crate::store::records::corrupt("jobs.payload_json", &payload))
        .and_then(|payload| {
            Ok(JobRecord {
                id: row.get(0)?,
                kind: row.get(1)?,
                payload,
                attempts: row.get(3)?,
                run_after: UnixMillis(row.get(4)?),
                claimed_until: row.get::<_, Option<i64>>(5)?.map(UnixMillis),
                last_error: row.get(6)?,
                created_at: UnixMillis(row.get(7)?),
            })
        }))
}
