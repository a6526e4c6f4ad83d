//! The durable job queue on PostgreSQL: replicas claim jobs with `FOR UPDATE SKIP LOCKED`, so
//! two runners never claim the same job and never wait for each other.

use std::time::Duration;

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use super::audit;
use crate::audit::AuditEvent;
use crate::domain::UnixMillis;
use crate::error::Result;
use crate::store::jobs::{ClaimedJob, JobOutcome, JobRecord, NewJob, claim_token};
use crate::store::records::corrupt;

pub async fn enqueue(
    connection: &mut PgConnection,
    jobs: &[NewJob],
    events: &[AuditEvent],
) -> Result<()> {
    let now = UnixMillis::now();
    sqlx::query(
        "INSERT INTO jobs (id, kind, payload_json, run_after, created_at) \
         SELECT id, kind, payload, run_after, $5 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[]) \
         AS v(id, kind, payload, run_after)",
    )
    .bind(jobs.iter().map(|job| job.id.as_str()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|job| job.kind.as_str()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|job| job.payload.to_string()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|job| job.run_after.0).collect::<Vec<_>>())
    .bind(now.0)
    .execute(&mut *connection)
    .await?;
    audit::insert_events(connection, &events.iter().collect::<Vec<_>>()).await
}

pub async fn claim(
    pool: &PgPool,
    kinds: &[String],
    limit: usize,
    lock_for: Duration,
    now: UnixMillis,
) -> Result<Vec<ClaimedJob>> {
    let claim = claim_token();
    let claimed_until = now.plus(lock_for);
    sqlx::query(
        "UPDATE jobs SET claim = $1, claimed_until = $2, attempts = attempts + 1 WHERE id IN \
         (SELECT id FROM jobs WHERE kind = ANY($3) AND run_after <= $4 \
          AND (claimed_until IS NULL OR claimed_until <= $4) ORDER BY run_after LIMIT $5 FOR UPDATE SKIP LOCKED) \
         RETURNING id, kind, payload_json, attempts",
    )
    .bind(&claim)
    .bind(claimed_until.0)
    .bind(kinds)
    .bind(now.0)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?
    .iter()
    .map(|row| {
        let payload: String = row.try_get(2)?;
        Ok(ClaimedJob {
            id: row.try_get(0)?,
            kind: row.try_get(1)?,
            payload: serde_json::from_str(&payload).map_err(|_| corrupt("jobs.payload_json", &payload))?,
            attempts: u32::try_from(row.try_get::<i32, _>(3)?).unwrap_or_default(),
            claim: claim.clone(),
            claimed_until,
        })
    })
    .collect()
}

pub async fn extend(pool: &PgPool, job: &ClaimedJob, until: UnixMillis) -> Result<bool> {
    Ok(
        sqlx::query("UPDATE jobs SET claimed_until = $1 WHERE id = $2 AND claim = $3")
            .bind(until.0)
            .bind(&job.id)
            .bind(&job.claim)
            .execute(pool)
            .await?
            .rows_affected()
            == 1,
    )
}

pub async fn finish(pool: &PgPool, job: &ClaimedJob, outcome: &JobOutcome) -> Result<bool> {
    let changed = match outcome {
        JobOutcome::Done => {
            sqlx::query("DELETE FROM jobs WHERE id = $1 AND claim = $2")
                .bind(&job.id)
                .bind(&job.claim)
                .execute(pool)
                .await?
        }
        JobOutcome::Failed { retry_at, error } => sqlx::query(
            "UPDATE jobs SET claim = NULL, claimed_until = NULL, run_after = $1, last_error = $2 \
                 WHERE id = $3 AND claim = $4",
        )
        .bind(retry_at.0)
        .bind(error)
        .bind(&job.id)
        .bind(&job.claim)
        .execute(pool)
        .await?,
    };
    Ok(changed.rows_affected() == 1)
}

pub async fn pending(pool: &PgPool, limit: usize) -> Result<Vec<JobRecord>> {
    sqlx::query(
        "SELECT id, kind, payload_json, attempts, run_after, claimed_until, last_error, created_at \
         FROM jobs ORDER BY created_at, id LIMIT $1",
    )
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?
    .iter()
    .map(job_record)
    .collect()
}

fn job_record(row: &PgRow) -> Result<JobRecord> {
    let payload: String = row.try_get(2)?;
    Ok(JobRecord {
        id: row.try_get(0)?,
        kind: row.try_get(1)?,
        payload: serde_json::from_str(&payload)
            .map_err(|_| corrupt("jobs.payload_json", &payload))?,
        attempts: u32::try_from(row.try_get::<i32, _>(3)?).unwrap_or_default(),
        run_after: UnixMillis(row.try_get(4)?),
        claimed_until: row.try_get::<Option<i64>, _>(5)?.map(UnixMillis),
        last_error: row.try_get(6)?,
        created_at: UnixMillis(row.try_get(7)?),
    })
}
