//! Signing keys on SQLite.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::audit;
use super::writer::Write;
use crate::audit::AuditEvent;
use crate::domain::UnixMillis;
use crate::error::{Error, Result};
use crate::issuer::KeyAlgorithm;
use crate::store::Topic;
use crate::store::records::{KeyColumns, StoredSigningKey, parse_stored};

const KEY_COLUMNS: &str = "kid, algorithm, public_key, sealed_private_key, created_at, retired_at, publish_until, activated_at";

pub fn insert(write: &mut Write<'_>, key: &StoredSigningKey, events: &[AuditEvent]) -> Result<()> {
    write
        .connection
        .prepare_cached(&format!(
            "INSERT INTO signing_keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        ))?
        .execute(params![
            key.kid,
            key.algorithm.jws_name(),
            key.public_key,
            key.sealed_private_key,
            key.created_at.0,
            key.retired_at.map(|at| at.0),
            key.publish_until.map(|at| at.0),
            key.activated_at.map(|at| at.0),
        ])?;
    audit::insert_events(write, events)?;
    write.topics.push(Topic::Keys);
    Ok(())
}

/// Retires `retired_kid`, activates `promoted_kid` and stores `new` as the next key; fails if
/// either has changed state since the caller read them.
pub fn rotate(
    write: &mut Write<'_>,
    new: &StoredSigningKey,
    promoted_kid: &str,
    retired_kid: &str,
    publish_until: UnixMillis,
    events: &[AuditEvent],
) -> Result<()> {
    let retired = write
        .connection
        .prepare_cached(
            "UPDATE signing_keys SET retired_at = ?1, publish_until = ?2 \
             WHERE kid = ?3 AND retired_at IS NULL AND activated_at IS NOT NULL",
        )?
        .execute(params![new.created_at.0, publish_until.0, retired_kid])?;
    let promoted = write
        .connection
        .prepare_cached(
            "UPDATE signing_keys SET activated_at = ?1 \
             WHERE kid = ?2 AND retired_at IS NULL AND activated_at IS NULL",
        )?
        .execute(params![new.created_at.0, promoted_kid])?;
    if retired != 1 || promoted != 1 {
        return Err(Error::FailedPrecondition(
            "the signing key changed during rotation (another rotation ran); retry".into(),
        ));
    }
    insert(write, new, events)
}

pub fn published(connection: &Connection, now: UnixMillis) -> Result<Vec<StoredSigningKey>> {
    connection
        .prepare_cached(&format!(
            "SELECT {KEY_COLUMNS} FROM signing_keys WHERE retired_at IS NULL OR publish_until > ?1 \
             ORDER BY created_at DESC"
        ))?
        .query_map([now.0], key_columns)?
        .map(|columns| columns?.into_record())
        .collect()
}

pub fn public_key(connection: &Connection, kid: &str) -> Result<Option<(KeyAlgorithm, Vec<u8>)>> {
    let found: Option<(String, Vec<u8>)> = connection
        .prepare_cached("SELECT algorithm, public_key FROM signing_keys WHERE kid = ?1")?
        .query_row([kid], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    found
        .map(|(algorithm, public_key)| {
            let algorithm = parse_stored(
                "signing_keys.algorithm",
                &algorithm,
                KeyAlgorithm::from_jws_name,
            )?;
            Ok((algorithm, public_key))
        })
        .transpose()
}

pub fn latest_expiry_signed_by(connection: &Connection, kid: &str) -> Result<Option<UnixMillis>> {
    Ok(connection
        .prepare_cached("SELECT MAX(expires_at) FROM leases WHERE kid = ?1")?
        .query_row([kid], |row| row.get::<_, Option<i64>>(0))?
        .map(UnixMillis))
}

fn key_columns(row: &Row<'_>) -> rusqlite::Result<KeyColumns> {
    Ok(KeyColumns {
        kid: row.get(0)?,
        algorithm: row.get(1)?,
        public_key: row.get(2)?,
        sealed_private_key: row.get(3)?,
        created_at: row.get(4)?,
        retired_at: row.get(5)?,
        publish_until: row.get(6)?,
        activated_at: row.get(7)?,
    })
}
