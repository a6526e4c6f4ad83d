//! Workload identity on SQLite: the CA key, join tokens and issued SVIDs.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::audit;
use super::workloads::{WORKLOAD_COLUMN_COUNT, WORKLOAD_COLUMNS, workload_columns};
use super::writer::Write;
use crate::audit::AuditEvent;
use crate::domain::UnixMillis;
use crate::error::{Error, Result};
use crate::store::Topic;
use crate::store::records::{
    CA_CHANGED_DURING_ROTATION, JoinTokenRecord, StoredCaKey, StoredJwtSvidKey, SvidRecord,
    WorkloadRecord,
};

/// Stores `key` unless its id is taken; the number of rows stored.
pub fn insert_ca_key(write: &mut Write<'_>, key: &StoredCaKey) -> Result<usize> {
    Ok(write
        .connection
        .prepare_cached(
            "INSERT INTO ca_keys (id, certificate, sealed_private_key, created_at, expires_at, \
             activated_at, publish_until) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            key.id,
            key.certificate,
            key.sealed_private_key,
            key.created_at.0,
            key.expires_at.0,
            key.activated_at.0,
            key.publish_until.map(|at| at.0),
        ])?)
}

/// Retires the CA `retiring_id` (in the bundle until `publish_until`) and stores `new`; refused
/// if `retiring_id` was retired already, by a rotation that ran concurrently.
pub fn rotate_ca(
    write: &mut Write<'_>,
    new: &StoredCaKey,
    retiring_id: &str,
    publish_until: UnixMillis,
    events: &[AuditEvent],
) -> Result<()> {
    let retired = write
        .connection
        .prepare_cached(
            "UPDATE ca_keys SET publish_until = ?1 WHERE id = ?2 AND publish_until IS NULL",
        )?
        .execute(params![publish_until.0, retiring_id])?;
    if retired != 1 {
        return Err(Error::FailedPrecondition(CA_CHANGED_DURING_ROTATION.into()));
    }
    if insert_ca_key(write, new)? != 1 {
        return Err(Error::FailedPrecondition(CA_CHANGED_DURING_ROTATION.into()));
    }
    write.topics.push(Topic::Keys);
    audit::insert_events(write, events)
}

/// Stores `key` unless its id is taken, and returns the key stored under the id.
pub fn insert_jwt_svid_key(
    write: &mut Write<'_>,
    key: &StoredJwtSvidKey,
) -> Result<StoredJwtSvidKey> {
    write
        .connection
        .prepare_cached(
            "INSERT INTO jwt_svid_keys (id, sealed_private_key, created_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT DO NOTHING",
        )?
        .execute(params![key.id, key.sealed_private_key, key.created_at.0])?;
    Ok(write
        .connection
        .prepare_cached(
            "SELECT id, sealed_private_key, created_at FROM jwt_svid_keys WHERE id = ?1",
        )?
        .query_row(params![key.id], |row| {
            Ok(StoredJwtSvidKey {
                id: row.get(0)?,
                sealed_private_key: row.get(1)?,
                created_at: UnixMillis(row.get(2)?),
            })
        })?)
}

/// The CAs in the trust bundle at `now`, oldest first.
pub fn published_ca_keys(connection: &Connection, now: UnixMillis) -> Result<Vec<StoredCaKey>> {
    connection
        .prepare_cached(
            "SELECT id, certificate, sealed_private_key, created_at, expires_at, activated_at, \
             publish_until FROM ca_keys WHERE publish_until IS NULL OR publish_until > ?1 \
             ORDER BY activated_at, id",
        )?
        .query_map([now.0], |row| {
            Ok(StoredCaKey {
                id: row.get(0)?,
                certificate: row.get(1)?,
                sealed_private_key: row.get(2)?,
                created_at: UnixMillis(row.get(3)?),
                expires_at: UnixMillis(row.get(4)?),
                activated_at: UnixMillis(row.get(5)?),
                publish_until: row.get::<_, Option<i64>>(6)?.map(UnixMillis),
            })
        })?
        .map(|key| Ok(key?))
        .collect()
}

/// The latest expiry of any SVID issued.
pub fn latest_svid_expiry(connection: &Connection) -> Result<Option<UnixMillis>> {
    Ok(connection
        .prepare_cached("SELECT MAX(expires_at) FROM svids")?
        .query_row([], |row| row.get::<_, Option<i64>>(0))?
        .map(UnixMillis))
}

pub fn insert_join_token(
    write: &mut Write<'_>,
    token: &JoinTokenRecord,
    events: &[AuditEvent],
) -> Result<()> {
    write
        .connection
        .prepare_cached(
            "INSERT INTO join_tokens (id, workload_id, secret_sha256, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            token.id,
            token.workload_id,
            token.secret_sha256,
            token.created_at.0,
            token.expires_at.0
        ])?;
    audit::insert_events(write, events)
}

pub fn find_join_token(
    connection: &Connection,
    id: &str,
) -> Result<Option<(JoinTokenRecord, WorkloadRecord)>> {
    connection
        .prepare_cached(&format!(
            "SELECT {WORKLOAD_COLUMNS}, t.id, t.secret_sha256, t.created_at, t.expires_at, \
             t.consumed_at FROM join_tokens t JOIN workloads w ON w.id = t.workload_id \
             WHERE t.id = ?1 AND t.revoked_at IS NULL AND w.revoked_at IS NULL"
        ))?
        .query_row([id], |row| {
            let token = JoinTokenRecord {
                id: row.get(WORKLOAD_COLUMN_COUNT)?,
                workload_id: row.get(0)?,
                secret_sha256: row.get(WORKLOAD_COLUMN_COUNT + 1)?,
                created_at: UnixMillis(row.get(WORKLOAD_COLUMN_COUNT + 2)?),
                expires_at: UnixMillis(row.get(WORKLOAD_COLUMN_COUNT + 3)?),
                consumed_at: row
                    .get::<_, Option<i64>>(WORKLOAD_COLUMN_COUNT + 4)?
                    .map(UnixMillis),
            };
            Ok((token, workload_columns(row)?))
        })
        .optional()?
        .map(|(token, columns)| Ok((token, columns.into_record()?)))
        .transpose()
}

pub fn consume_join_token(
    write: &mut Write<'_>,
    id: &str,
    now: UnixMillis,
    svid: &SvidRecord,
    events: &[AuditEvent],
) -> Result<bool> {
    let consumed = write
        .connection
        .prepare_cached(
            "UPDATE join_tokens SET consumed_at = ?1 WHERE id = ?2 AND consumed_at IS NULL \
             AND revoked_at IS NULL AND expires_at > ?1",
        )?
        .execute(params![now.0, id])?;
    if consumed == 0 {
        return Ok(false);
    }
    insert_svid(write, svid, events)?;
    Ok(true)
}

pub fn insert_svid(write: &mut Write<'_>, svid: &SvidRecord, events: &[AuditEvent]) -> Result<()> {
    write
        .connection
        .prepare_cached(
            "INSERT INTO svids (thumbprint, workload_id, serial, issued_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            svid.thumbprint,
            svid.workload_id,
            svid.serial,
            svid.issued_at.0,
            svid.expires_at.0
        ])?;
    audit::insert_events(write, events)
}

pub fn find_svid(
    connection: &Connection,
    thumbprint: &str,
) -> Result<Option<(SvidRecord, WorkloadRecord)>> {
    connection
        .prepare_cached(&format!(
            "SELECT {WORKLOAD_COLUMNS}, s.thumbprint, s.serial, s.issued_at, s.expires_at \
             FROM svids s JOIN workloads w ON w.id = s.workload_id \
             WHERE s.thumbprint = ?1 AND s.revoked_at IS NULL AND w.revoked_at IS NULL"
        ))?
        .query_row([thumbprint], |row| {
            Ok((svid_columns(row)?, workload_columns(row)?))
        })
        .optional()?
        .map(|(svid, columns)| Ok((svid, columns.into_record()?)))
        .transpose()
}

fn svid_columns(row: &Row<'_>) -> rusqlite::Result<SvidRecord> {
    Ok(SvidRecord {
        workload_id: row.get(0)?,
        thumbprint: row.get(WORKLOAD_COLUMN_COUNT)?,
        serial: row.get(WORKLOAD_COLUMN_COUNT + 1)?,
        issued_at: UnixMillis(row.get(WORKLOAD_COLUMN_COUNT + 2)?),
        expires_at: UnixMillis(row.get(WORKLOAD_COLUMN_COUNT + 3)?),
    })
}
