//! Workloads and their bearer credentials on PostgreSQL.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use super::audit;
use crate::audit::AuditEvent;
use crate::domain::{TaskId, UnixMillis, WorkloadName};
use crate::error::{Error, Result};
use crate::issuer::credential::StoredCredential;
use crate::store::records::{IdentityEnd, WorkloadColumns, WorkloadRecord, roles_text};

/// The workload columns, in the order [`workload_columns`] decodes them.
macro_rules! workload_columns {
    () => {
        "w.id, w.name, w.spiffe_id, w.roles, w.created_at, w.audiences, w.selectors, w.revoked_at, \
         w.labels, w.deleted_at"
    };
}

/// The same columns, for queries built with `format!`.
pub(super) const WORKLOAD_COLUMNS: &str = workload_columns!();

/// How many columns [`WORKLOAD_COLUMNS`] lists: a query's own columns come after them.
pub(super) const WORKLOAD_COLUMN_COUNT: usize = 10;

pub async fn create(
    connection: &mut PgConnection,
    workload: &WorkloadRecord,
    credential: Option<&StoredCredential>,
    events: &[AuditEvent],
) -> Result<()> {
    let inserted = sqlx::query(
        "INSERT INTO workloads \
         (id, name, spiffe_id, roles, created_at, audiences, selectors, labels) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind(&workload.id)
    .bind(workload.name.as_str())
    .bind(workload.spiffe_id.as_str())
    .bind(roles_text(&workload.roles))
    .bind(workload.created_at.0)
    .bind(workload.audiences.join(" "))
    .bind(workload.selectors.join(" "))
    .bind(workload.labels.to_json())
    .execute(&mut *connection)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Error::AlreadyExists(format!(
            "name: workload '{}' already exists",
            workload.name
        )));
    }
    if let Some(credential) = credential {
        insert_credential(connection, &workload.id, credential, workload.created_at).await?;
    }
    audit::insert_events(connection, &events.iter().collect::<Vec<_>>()).await
}

/// See [`crate::store::Store::replace_workload_credentials`]. The workload row is locked, so
/// two rotations of one workload on two replicas leave exactly one valid credential.
pub async fn replace_credentials(
    connection: &mut PgConnection,
    name: &WorkloadName,
    replacement: Option<&StoredCredential>,
    now: UnixMillis,
    events: &[AuditEvent],
) -> Result<Option<WorkloadRecord>> {
    let Some(row) = sqlx::query(concat!(
        "SELECT ",
        workload_columns!(),
        " FROM workloads w WHERE w.name = $1 AND w.deleted_at IS NULL FOR UPDATE"
    ))
    .bind(name.as_str())
    .fetch_optional(&mut *connection)
    .await?
    else {
        return Ok(None);
    };
    let workload = workload_columns(&row)?.into_record()?;
    sqlx::query(
        "UPDATE workload_credentials SET revoked_at = $1 WHERE workload_id = $2 AND revoked_at IS NULL",
    )
    .bind(now.0)
    .bind(&workload.id)
    .execute(&mut *connection)
    .await?;
    match replacement {
        Some(credential) => insert_credential(connection, &workload.id, credential, now).await?,
        None => {
            for statement in [
                "UPDATE svids SET revoked_at = $1 WHERE workload_id = $2 AND revoked_at IS NULL",
                "UPDATE join_tokens SET revoked_at = $1 \
                 WHERE workload_id = $2 AND revoked_at IS NULL AND consumed_at IS NULL",
            ] {
                sqlx::query(statement)
                    .bind(now.0)
                    .bind(&workload.id)
                    .execute(&mut *connection)
                    .await?;
            }
        }
    }
    audit::insert_events(connection, &events.iter().collect::<Vec<_>>()).await?;
    Ok(Some(workload))
}

/// See [`crate::store::Store::revoke_identity`].
pub async fn revoke_identity(
    connection: &mut PgConnection,
    name: &WorkloadName,
    end: IdentityEnd,
    now: UnixMillis,
    events: &[AuditEvent],
) -> Result<Option<WorkloadRecord>> {
    let Some(mut workload) = replace_credentials(connection, name, None, now, events).await? else {
        return Ok(None);
    };
    sqlx::query("UPDATE workloads SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
        .bind(now.0)
        .bind(&workload.id)
        .execute(&mut *connection)
        .await?;
    workload.revoked_at.get_or_insert(now);
    if end == IdentityEnd::Deleted {
        sqlx::query("UPDATE workloads SET deleted_at = $1, selectors = '' WHERE id = $2")
            .bind(now.0)
            .bind(&workload.id)
            .execute(&mut *connection)
            .await?;
        workload.deleted_at = Some(now);
    }
    Ok(Some(workload))
}

async fn insert_credential(
    connection: &mut PgConnection,
    workload_id: &str,
    credential: &StoredCredential,
    at: UnixMillis,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO workload_credentials (id, workload_id, secret_sha256, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(&credential.id)
    .bind(workload_id)
    .bind(&credential.secret_sha256)
    .bind(at.0)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

pub async fn has_any(pool: &PgPool) -> Result<bool> {
    Ok(sqlx::query("SELECT EXISTS (SELECT 1 FROM workloads)")
        .fetch_one(pool)
        .await?
        .try_get(0)?)
}

pub async fn find_credential(
    pool: &PgPool,
    credential_id: &str,
) -> Result<Option<(Vec<u8>, WorkloadRecord)>> {
    sqlx::query(concat!(
        "SELECT ",
        workload_columns!(),
        ", c.secret_sha256 FROM workload_credentials c \
         JOIN workloads w ON w.id = c.workload_id WHERE c.id = $1 AND c.revoked_at IS NULL AND w.revoked_at IS NULL"
    ))
    .bind(credential_id)
    .fetch_optional(pool)
    .await?
    .map(|row| Ok((row.try_get(WORKLOAD_COLUMN_COUNT)?, workload_columns(&row)?.into_record()?)))
    .transpose()
}

pub async fn active_tasks_of(pool: &PgPool, workload_id: &str) -> Result<Vec<TaskId>> {
    sqlx::query("SELECT id FROM tasks WHERE workload_id = $1 AND state = 'active'")
        .bind(workload_id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|row| Ok(TaskId::from_stored(row.try_get(0)?)))
        .collect()
}

pub async fn list(pool: &PgPool) -> Result<Vec<WorkloadRecord>> {
    sqlx::query(concat!(
        "SELECT ",
        workload_columns!(),
        " FROM workloads w WHERE w.deleted_at IS NULL ORDER BY w.name"
    ))
    .fetch_all(pool)
    .await?
    .iter()
    .map(|row| workload_columns(row)?.into_record())
    .collect()
}

pub async fn find(pool: &PgPool, name: &WorkloadName) -> Result<Option<WorkloadRecord>> {
    sqlx::query(concat!(
        "SELECT ",
        workload_columns!(),
        " FROM workloads w WHERE w.name = $1 AND w.deleted_at IS NULL"
    ))
    .bind(name.as_str())
    .fetch_optional(pool)
    .await?
    .map(|row| workload_columns(&row)?.into_record())
    .transpose()
}

pub(super) fn workload_columns(row: &PgRow) -> Result<WorkloadColumns> {
    Ok(WorkloadColumns {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        spiffe_id: row.try_get(2)?,
        roles: row.try_get(3)?,
        created_at: row.try_get(4)?,
        audiences: row.try_get(5)?,
        selectors: row.try_get(6)?,
        revoked_at: row.try_get(7)?,
        labels: row.try_get(8)?,
        deleted_at: row.try_get(9)?,
    })
}
