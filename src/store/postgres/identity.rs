//! Workload identity on PostgreSQL: the CA key, join tokens and issued SVIDs.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use super::audit;
use super::workloads::{WORKLOAD_COLUMN_COUNT, WORKLOAD_COLUMNS, workload_columns};
use crate::audit::AuditEvent;
use crate::domain::UnixMillis;
use crate::error::{Error, Result};
use crate::store::records::{
    CA_CHANGED_DURING_ROTATION, JoinTokenRecord, StoredCaKey, StoredJwtSvidKey, SvidRecord,
    WorkloadRecord,
};

/// Stores `key` unless its id is taken, and returns the key stored under the id.
pub async fn insert_jwt_svid_key(
    pool: &PgPool,
    key: &StoredJwtSvidKey,
) -> Result<StoredJwtSvidKey> {
    sqlx::query(
        "INSERT INTO jwt_svid_keys (id, sealed_private_key, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&key.id)
    .bind(&key.sealed_private_key)
    .bind(key.created_at.0)
    .execute(pool)
    .await?;
    let row =
        sqlx::query("SELECT id, sealed_private_key, created_at FROM jwt_svid_keys WHERE id = $1")
            .bind(&key.id)
            .fetch_one(pool)
            .await?;
    Ok(StoredJwtSvidKey {
        id: row.try_get(0)?,
        sealed_private_key: row.try_get(1)?,
        created_at: UnixMillis(row.try_get(2)?),
    })
}

const CA_COLUMNS: &str =
    "id, certificate, sealed_private_key, created_at, expires_at, activated_at, publish_until";

pub async fn insert_ca_key(pool: &PgPool, key: &StoredCaKey) -> Result<Vec<StoredCaKey>> {
    insert_ca(pool, key).await?;
    published_ca_keys(pool, key.created_at).await
}

/// Stores `key` unless its id is taken; the number of rows stored.
async fn insert_ca<'e>(executor: impl sqlx::PgExecutor<'e>, key: &StoredCaKey) -> Result<u64> {
    Ok(sqlx::query(&format!(
        "INSERT INTO ca_keys ({CA_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT DO NOTHING"
    ))
    .bind(&key.id)
    .bind(&key.certificate)
    .bind(&key.sealed_private_key)
    .bind(key.created_at.0)
    .bind(key.expires_at.0)
    .bind(key.activated_at.0)
    .bind(key.publish_until.map(|at| at.0))
    .execute(executor)
    .await?
    .rows_affected())
}

/// The CAs in the trust bundle at `now`, oldest activation first.
pub async fn published_ca_keys(pool: &PgPool, now: UnixMillis) -> Result<Vec<StoredCaKey>> {
    sqlx::query(&format!(
        "SELECT {CA_COLUMNS} FROM ca_keys WHERE publish_until IS NULL OR publish_until > $1 \
         ORDER BY activated_at, id"
    ))
    .bind(now.0)
    .fetch_all(pool)
    .await?
    .iter()
    .map(|row| {
        Ok(StoredCaKey {
            id: row.try_get(0)?,
            certificate: row.try_get(1)?,
            sealed_private_key: row.try_get(2)?,
            created_at: UnixMillis(row.try_get(3)?),
            expires_at: UnixMillis(row.try_get(4)?),
            activated_at: UnixMillis(row.try_get(5)?),
            publish_until: row.try_get::<Option<i64>, _>(6)?.map(UnixMillis),
        })
    })
    .collect()
}

/// Retires the CA `retiring_id` (in the bundle until `publish_until`) and stores `new`; refused
/// if `retiring_id` was retired already, by a rotation that ran concurrently.
pub async fn rotate_ca(
    connection: &mut PgConnection,
    new: &StoredCaKey,
    retiring_id: &str,
    publish_until: UnixMillis,
    events: &[AuditEvent],
) -> Result<()> {
    let retired = sqlx::query(
        "UPDATE ca_keys SET publish_until = $1 WHERE id = $2 AND publish_until IS NULL",
    )
    .bind(publish_until.0)
    .bind(retiring_id)
    .execute(&mut *connection)
    .await?
    .rows_affected();
    if retired != 1 {
        return Err(Error::FailedPrecondition(CA_CHANGED_DURING_ROTATION.into()));
    }
    if insert_ca(&mut *connection, new).await? != 1 {
        return Err(Error::FailedPrecondition(CA_CHANGED_DURING_ROTATION.into()));
    }
    audit::insert_events(connection, &events.iter().collect::<Vec<_>>()).await
}

/// The latest expiry of any SVID issued.
pub async fn latest_svid_expiry(pool: &PgPool) -> Result<Option<UnixMillis>> {
    Ok(
        sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(expires_at) FROM svids")
            .fetch_one(pool)
            .await?
            .map(UnixMillis),
    )
}

pub async fn insert_join_token(
    connection: &mut PgConnection,
    token: &JoinTokenRecord,
    events: &[AuditEvent],
) -> Result<()> {
    sqlx::query(
        "INSERT INTO join_tokens (id, workload_id, secret_sha256, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&token.id)
    .bind(&token.workload_id)
    .bind(&token.secret_sha256)
    .bind(token.created_at.0)
    .bind(token.expires_at.0)
    .execute(&mut *connection)
    .await?;
    audit::insert_events(connection, &events.iter().collect::<Vec<_>>()).await
}

pub async fn find_join_token(
    pool: &PgPool,
    id: &str,
) -> Result<Option<(JoinTokenRecord, WorkloadRecord)>> {
    let query = format!(
        "SELECT {WORKLOAD_COLUMNS}, t.id, t.secret_sha256, t.created_at, t.expires_at, \
         t.consumed_at FROM join_tokens t JOIN workloads w ON w.id = t.workload_id \
         WHERE t.id = $1 AND t.revoked_at IS NULL AND w.revoked_at IS NULL"
    );
    let Some(row) = sqlx::query(&query).bind(id).fetch_optional(pool).await? else {
        return Ok(None);
    };
    let token = JoinTokenRecord {
        id: row.try_get(WORKLOAD_COLUMN_COUNT)?,
        workload_id: row.try_get(0)?,
        secret_sha256: row.try_get(WORKLOAD_COLUMN_COUNT + 1)?,
        created_at: UnixMillis(row.try_get(WORKLOAD_COLUMN_COUNT + 2)?),
        expires_at: UnixMillis(row.try_get(WORKLOAD_COLUMN_COUNT + 3)?),
        consumed_at: row
            .try_get::<Option<i64>, _>(WORKLOAD_COLUMN_COUNT + 4)?
            .map(UnixMillis),
    };
    Ok(Some((token, workload_columns(&row)?.into_record()?)))
}

pub async fn find_svid(
    pool: &PgPool,
    thumbprint: &str,
) -> Result<Option<(SvidRecord, WorkloadRecord)>> {
    let query = format!(
        "SELECT {WORKLOAD_COLUMNS}, s.thumbprint, s.serial, s.issued_at, s.expires_at \
         FROM svids s JOIN workloads w ON w.id = s.workload_id \
         WHERE s.thumbprint = $1 AND s.revoked_at IS NULL AND w.revoked_at IS NULL"
    );
    sqlx::query(&query)
        .bind(thumbprint)
        .fetch_optional(pool)
        .await?
        .map(|row| Ok((svid_columns(&row)?, workload_columns(&row)?.into_record()?)))
        .transpose()
}

fn svid_columns(row: &PgRow) -> Result<SvidRecord> {
    Ok(SvidRecord {
        workload_id: row.try_get(0)?,
        thumbprint: row.try_get(WORKLOAD_COLUMN_COUNT)?,
        serial: row.try_get(WORKLOAD_COLUMN_COUNT + 1)?,
        issued_at: UnixMillis(row.try_get(WORKLOAD_COLUMN_COUNT + 2)?),
        expires_at: UnixMillis(row.try_get(WORKLOAD_COLUMN_COUNT + 3)?),
    })
}
