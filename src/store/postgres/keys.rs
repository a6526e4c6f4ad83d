//! Signing keys on PostgreSQL.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use super::audit;
use crate::audit::AuditEvent;
use crate::domain::UnixMillis;
use crate::error::{Error, Result};
use crate::issuer::KeyAlgorithm;
use crate::store::records::{KeyColumns, StoredSigningKey, parse_stored};

/// The key columns, in the order [`key_columns`] decodes them.
macro_rules! key_columns {
    () => {
        "kid, algorithm, public_key, sealed_private_key, created_at, retired_at, publish_until, activated_at"
    };
}

pub async fn insert(
    connection: &mut PgConnection,
    key: &StoredSigningKey,
    events: &[AuditEvent],
) -> Result<()> {
    sqlx::query(concat!(
        "INSERT INTO signing_keys (",
        key_columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
    ))
    .bind(&key.kid)
    .bind(key.algorithm.jws_name())
    .bind(&key.public_key)
    .bind(&key.sealed_private_key)
    .bind(key.created_at.0)
    .bind(key.retired_at.map(|at| at.0))
    .bind(key.publish_until.map(|at| at.0))
    .bind(key.activated_at.map(|at| at.0))
    .execute(&mut *connection)
    .await?;
    audit::insert_events(connection, &events.iter().collect::<Vec<_>>()).await
}

/// Retires `retired_kid`, activates `promoted_kid` and stores `new` as the next key; fails if
/// either has changed state since the caller read them (a concurrent rotation, possibly on
/// another replica). Both keys change in one statement; a deadlock between two rotations is
/// retried by the committer like any other.
pub async fn rotate(
    connection: &mut PgConnection,
    new: &StoredSigningKey,
    promoted_kid: &str,
    retired_kid: &str,
    publish_until: UnixMillis,
    events: &[AuditEvent],
) -> Result<()> {
    let changed = sqlx::query(
        "UPDATE signing_keys SET \
           retired_at = CASE WHEN kid = $3 THEN $1 ELSE retired_at END, \
           publish_until = CASE WHEN kid = $3 THEN $2 ELSE publish_until END, \
           activated_at = CASE WHEN kid = $4 THEN $1 ELSE activated_at END \
         WHERE (kid = $3 AND retired_at IS NULL AND activated_at IS NOT NULL) \
            OR (kid = $4 AND retired_at IS NULL AND activated_at IS NULL)",
    )
    .bind(new.created_at.0)
    .bind(publish_until.0)
    .bind(retired_kid)
    .bind(promoted_kid)
    .execute(&mut *connection)
    .await?;
    if changed.rows_affected() != 2 {
        return Err(Error::FailedPrecondition(
            "the signing key changed during rotation (another rotation ran); retry".into(),
        ));
    }
    insert(connection, new, events).await
}

pub async fn published(pool: &PgPool, now: UnixMillis) -> Result<Vec<StoredSigningKey>> {
    sqlx::query(concat!(
        "SELECT ",
        key_columns!(),
        " FROM signing_keys WHERE retired_at IS NULL OR publish_until > $1 ORDER BY created_at DESC"
    ))
    .bind(now.0)
    .fetch_all(pool)
    .await?
    .iter()
    .map(|row| key_columns(row)?.into_record())
    .collect()
}

pub async fn public_key(pool: &PgPool, kid: &str) -> Result<Option<(KeyAlgorithm, Vec<u8>)>> {
    let Some(row) = sqlx::query("SELECT algorithm, public_key FROM signing_keys WHERE kid = $1")
        .bind(kid)
        .fetch_optional(pool)
        .await?
    else {
        return Ok(None);
    };
    let algorithm: String = row.try_get(0)?;
    let algorithm = parse_stored(
        "signing_keys.algorithm",
        &algorithm,
        KeyAlgorithm::from_jws_name,
    )?;
    Ok(Some((algorithm, row.try_get(1)?)))
}

pub async fn latest_expiry_signed_by(pool: &PgPool, kid: &str) -> Result<Option<UnixMillis>> {
    let row = sqlx::query("SELECT MAX(expires_at) FROM leases WHERE kid = $1")
        .bind(kid)
        .fetch_one(pool)
        .await?;
    Ok(row.try_get::<Option<i64>, _>(0)?.map(UnixMillis))
}

fn key_columns(row: &PgRow) -> Result<KeyColumns> {
    Ok(KeyColumns {
        kid: row.try_get(0)?,
        algorithm: row.try_get(1)?,
        public_key: row.try_get(2)?,
        sealed_private_key: row.try_get(3)?,
        created_at: row.try_get(4)?,
        retired_at: row.try_get(5)?,
        publish_until: row.try_get(6)?,
        activated_at: row.try_get(7)?,
    })
}
