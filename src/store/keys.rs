//! Signing keys: the current one and the retired ones still published.

use super::records::{KEY_COLUMNS, StoredSigningKey};
use super::{Store, audit};
use crate::audit::AuditEvent;
use crate::domain::UnixMillis;
use crate::error::{Error, Result};
use crate::issuer::KeyAlgorithm;

impl Store {
    /// Stores a new signing key with `events`, in one transaction.
    pub async fn insert_signing_key(
        &self,
        key: &StoredSigningKey,
        events: &[AuditEvent],
    ) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        insert_key(&mut tx, key).await?;
        audit::insert_events(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Keys that belong in the JWKS at `now`: the current key and retired keys whose
    /// publication window is still open, newest first.
    pub async fn published_signing_keys(&self, now: UnixMillis) -> Result<Vec<StoredSigningKey>> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM signing_keys WHERE retired_at IS NULL OR publish_until > $1 \
             ORDER BY created_at DESC"
        ))
        .bind(now.0)
        .fetch_all(&self.writer)
        .await?;
        rows.iter().map(StoredSigningKey::from_row).collect()
    }

    /// The algorithm and public key of `kid`, current, retired or expired: what checks a
    /// signature made long ago, such as an audit checkpoint's.
    pub async fn signing_public_key(&self, kid: &str) -> Result<Option<(KeyAlgorithm, Vec<u8>)>> {
        let row = sqlx::query("SELECT algorithm, public_key FROM signing_keys WHERE kid = $1")
            .bind(kid)
            .fetch_optional(&self.reader)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let algorithm: String = sqlx::Row::try_get(&row, "algorithm")?;
        let algorithm = KeyAlgorithm::from_jws_name(&algorithm)
            .ok_or_else(|| super::records::corrupt("signing_keys.algorithm", &algorithm))?;
        Ok(Some((algorithm, sqlx::Row::try_get(&row, "public_key")?)))
    }

    /// The latest expiry of any lease whose current token `kid` signed.
    pub async fn latest_expiry_signed_by(&self, kid: &str) -> Result<Option<UnixMillis>> {
        let row = sqlx::query("SELECT MAX(expires_at) AS latest FROM leases WHERE kid = $1")
            .bind(kid)
            .fetch_one(&self.writer)
            .await?;
        Ok(sqlx::Row::try_get::<Option<i64>, _>(&row, "latest")?.map(UnixMillis))
    }

    /// Retires `retired_kid` (published until `publish_until`) and stores `new` as the current
    /// key, atomically. Fails if `retired_kid` is no longer current (a concurrent rotation).
    pub async fn rotate_signing_key(
        &self,
        new: &StoredSigningKey,
        retired_kid: &str,
        publish_until: UnixMillis,
        events: &[AuditEvent],
    ) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let retired = sqlx::query(
            "UPDATE signing_keys SET retired_at = $1, publish_until = $2 WHERE kid = $3 AND retired_at IS NULL",
        )
        .bind(new.created_at.0)
        .bind(publish_until.0)
        .bind(retired_kid)
        .execute(&mut *tx)
        .await?;
        if retired.rows_affected() != 1 {
            return Err(Error::FailedPrecondition(
                "the signing key changed during rotation (another rotation ran); retry".into(),
            ));
        }
        insert_key(&mut tx, new).await?;
        audit::insert_events(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }
}

async fn insert_key(connection: &mut sqlx::AnyConnection, key: &StoredSigningKey) -> Result<()> {
    sqlx::query(&format!(
        "INSERT INTO signing_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
    ))
    .bind(&key.kid)
    .bind(key.algorithm.jws_name())
    .bind(&key.public_key)
    .bind(&key.sealed_private_key)
    .bind(key.created_at.0)
    .bind(key.retired_at.map(|at| at.0))
    .bind(key.publish_until.map(|at| at.0))
    .execute(connection)
    .await?;
    Ok(())
}
