//! Workloads and their bearer credentials on SQLite.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::audit;
use super::writer::Write;
use crate::audit::AuditEvent;
use crate::domain::{TaskId, UnixMillis, WorkloadName};
use crate::error::{Error, Result};
use crate::issuer::credential::StoredCredential;
use crate::store::Topic;
use crate::store::records::{IdentityEnd, WorkloadColumns, WorkloadRecord, roles_text};

pub(super) const WORKLOAD_COLUMNS: &str = "w.id, w.name, w.spiffe_id, w.roles, w.created_at, w.audiences, w.selectors, w.revoked_at, w.labels, w.deleted_at";

/// How many columns [`WORKLOAD_COLUMNS`] lists: a query's own columns come after them.
pub(super) const WORKLOAD_COLUMN_COUNT: usize = 10;

pub fn create(
    write: &mut Write<'_>,
    workload: &WorkloadRecord,
    credential: Option<&StoredCredential>,
    events: &[AuditEvent],
) -> Result<()> {
    let inserted = write
        .connection
        .prepare_cached(
            "INSERT INTO workloads \
             (id, name, spiffe_id, roles, created_at, audiences, selectors, labels) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            workload.id,
            workload.name.as_str(),
            workload.spiffe_id.as_str(),
            roles_text(&workload.roles),
            workload.created_at.0,
            workload.audiences.join(" "),
            workload.selectors.join(" "),
            workload.labels.to_json(),
        ])?;
    if inserted == 0 {
        return Err(Error::AlreadyExists(format!(
            "name: workload '{}' already exists",
            workload.name
        )));
    }
    if let Some(credential) = credential {
        insert_credential(write, &workload.id, credential, workload.created_at)?;
    }
    audit::insert_events(write, events)?;
    write.topics.push(Topic::Workloads);
    Ok(())
}

/// See [`crate::store::Store::replace_workload_credentials`].
pub fn replace_credentials(
    write: &mut Write<'_>,
    name: &WorkloadName,
    replacement: Option<&StoredCredential>,
    now: UnixMillis,
    events: &[AuditEvent],
) -> Result<Option<WorkloadRecord>> {
    let Some(workload) = write
        .connection
        .prepare_cached(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads w WHERE w.name = ?1 AND w.deleted_at IS NULL"
        ))?
        .query_row([name.as_str()], workload_columns)
        .optional()?
        .map(WorkloadColumns::into_record)
        .transpose()?
    else {
        return Ok(None);
    };
    write
        .connection
        .prepare_cached(
            "UPDATE workload_credentials SET revoked_at = ?1 WHERE workload_id = ?2 AND revoked_at IS NULL",
        )?
        .execute(params![now.0, workload.id])?;
    match replacement {
        Some(credential) => insert_credential(write, &workload.id, credential, now)?,
        None => {
            for statement in [
                "UPDATE svids SET revoked_at = ?1 WHERE workload_id = ?2 AND revoked_at IS NULL",
                "UPDATE join_tokens SET revoked_at = ?1 \
                 WHERE workload_id = ?2 AND revoked_at IS NULL AND consumed_at IS NULL",
            ] {
                write
                    .connection
                    .prepare_cached(statement)?
                    .execute(params![now.0, workload.id])?;
            }
        }
    }
    audit::insert_events(write, events)?;
    write.topics.push(Topic::Workloads);
    Ok(Some(workload))
}

/// See [`crate::store::Store::revoke_identity`].
pub fn revoke_identity(
    write: &mut Write<'_>,
    name: &WorkloadName,
    end: IdentityEnd,
    now: UnixMillis,
    events: &[AuditEvent],
) -> Result<Option<WorkloadRecord>> {
    let Some(mut workload) = replace_credentials(write, name, None, now, events)? else {
        return Ok(None);
    };
    write
        .connection
        .prepare_cached(
            "UPDATE workloads SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
        )?
        .execute(params![now.0, workload.id])?;
    workload.revoked_at.get_or_insert(now);
    if end == IdentityEnd::Deleted {
        write
            .connection
            .prepare_cached("UPDATE workloads SET deleted_at = ?1, selectors = '' WHERE id = ?2")?
            .execute(params![now.0, workload.id])?;
        workload.deleted_at = Some(now);
    }
    Ok(Some(workload))
}

fn insert_credential(
    write: &mut Write<'_>,
    workload_id: &str,
    credential: &StoredCredential,
    at: UnixMillis,
) -> Result<()> {
    write
        .connection
        .prepare_cached(
            "INSERT INTO workload_credentials (id, workload_id, secret_sha256, created_at) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![
            credential.id,
            workload_id,
            credential.secret_sha256,
            at.0
        ])?;
    Ok(())
}

pub fn has_any(connection: &Connection) -> Result<bool> {
    Ok(connection
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM workloads)")?
        .query_row([], |row| row.get(0))?)
}

pub fn find_credential(
    connection: &Connection,
    credential_id: &str,
) -> Result<Option<(Vec<u8>, WorkloadRecord)>> {
    connection
        .prepare_cached(&format!(
            "SELECT {WORKLOAD_COLUMNS}, c.secret_sha256 FROM workload_credentials c \
             JOIN workloads w ON w.id = c.workload_id WHERE c.id = ?1 AND c.revoked_at IS NULL AND w.revoked_at IS NULL"
        ))?
        .query_row([credential_id], |row| {
            Ok((row.get(WORKLOAD_COLUMN_COUNT)?, workload_columns(row)?))
        })
        .optional()?
        .map(|(secret, columns)| Ok((secret, columns.into_record()?)))
        .transpose()
}

pub fn active_tasks_of(connection: &Connection, workload_id: &str) -> Result<Vec<TaskId>> {
    connection
        .prepare_cached("SELECT id FROM tasks WHERE workload_id = ?1 AND state = 'active'")?
        .query_map([workload_id], |row| row.get(0))?
        .map(|id| Ok(TaskId::from_stored(id?)))
        .collect()
}

pub fn list(connection: &Connection) -> Result<Vec<WorkloadRecord>> {
    connection
        .prepare_cached(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads w WHERE w.deleted_at IS NULL ORDER BY w.name"
        ))?
        .query_map([], workload_columns)?
        .map(|columns| columns?.into_record())
        .collect()
}

pub fn find(connection: &Connection, name: &WorkloadName) -> Result<Option<WorkloadRecord>> {
    connection
        .prepare_cached(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads w WHERE w.name = ?1 AND w.deleted_at IS NULL"
        ))?
        .query_row([name.as_str()], workload_columns)
        .optional()?
        .map(WorkloadColumns::into_record)
        .transpose()
}

pub(super) fn workload_columns(row: &Row<'_>) -> rusqlite::Result<WorkloadColumns> {
    Ok(WorkloadColumns {
        id: row.get(0)?,
        name: row.get(1)?,
        spiffe_id: row.get(2)?,
        roles: row.get(3)?,
        created_at: row.get(4)?,
        audiences: row.get(5)?,
        selectors: row.get(6)?,
        revoked_at: row.get(7)?,
        labels: row.get(8)?,
        deleted_at: row.get(9)?,
    })
}
