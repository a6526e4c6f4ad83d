//! Workloads and their bearer credentials.

use std::time::{Duration, Instant};

use super::records::{WORKLOAD_COLUMNS, WorkloadRecord};
use super::{Store, audit};
use crate::audit::AuditEvent;
use crate::error::{Error, Result};
use crate::issuer::credential::StoredCredential;

/// How long an authenticated credential is answered from memory; also the longest a change to a
/// workload or credential can take to reach a running broker.
pub const CREDENTIAL_CACHE_TTL: Duration = Duration::from_secs(10);
/// Credentials kept at most (the cache starts over beyond).
const CREDENTIAL_CACHE_ENTRIES: usize = 10_000;

/// Credential id -> (when read, stored hash and workload).
pub(super) type CredentialCache =
    std::sync::Mutex<std::collections::HashMap<String, (Instant, (Vec<u8>, WorkloadRecord))>>;

impl Store {
    /// Stores a workload with its first credential and `events`, in one transaction.
    pub async fn create_workload(
        &self,
        workload: &WorkloadRecord,
        credential: &StoredCredential,
        events: &[AuditEvent],
    ) -> Result<()> {
        let roles: Vec<&str> = workload.roles.iter().map(|role| role.as_str()).collect();
        let mut tx = self.writer.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO workloads (id, name, spiffe_id, roles, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&workload.id)
        .bind(workload.name.as_str())
        .bind(workload.spiffe_id.as_str())
        .bind(roles.join(" "))
        .bind(workload.created_at.0)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(Error::AlreadyExists(format!(
                "name: workload '{}' already exists",
                workload.name
            )));
        }
        sqlx::query(
            "INSERT INTO workload_credentials (id, workload_id, secret_sha256, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&credential.id)
        .bind(&workload.id)
        .bind(&credential.secret_sha256)
        .bind(workload.created_at.0)
        .execute(&mut *tx)
        .await?;
        audit::insert_events(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether any workload is registered (a fresh store has none).
    pub async fn has_workloads(&self) -> Result<bool> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM workloads")
            .fetch_one(&self.writer)
            .await?;
        Ok(sqlx::Row::try_get::<i64, _>(&row, "n")? > 0)
    }

    /// Like [`Store::find_credential`], answered from memory for [`CREDENTIAL_CACHE_TTL`] after
    /// a read: every call authenticates, and workloads and credentials rarely change. Unknown ids
    /// are not cached.
    pub async fn find_credential_cached(
        &self,
        credential_id: &str,
    ) -> Result<Option<(Vec<u8>, WorkloadRecord)>> {
        let now = Instant::now();
        if let Some((read_at, found)) = self
            .credential_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(credential_id)
            && now.duration_since(*read_at) < CREDENTIAL_CACHE_TTL
        {
            return Ok(Some(found.clone()));
        }
        let found = self.find_credential(credential_id).await?;
        if let Some(found) = &found {
            let mut cache = self
                .credential_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CREDENTIAL_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(credential_id.to_owned(), (now, found.clone()));
        }
        Ok(found)
    }

    /// The workload holding the unrevoked credential `credential_id`, with the credential's
    /// secret hash for the caller to compare.
    pub async fn find_credential(
        &self,
        credential_id: &str,
    ) -> Result<Option<(Vec<u8>, WorkloadRecord)>> {
        let row = sqlx::query(&format!(
            "SELECT c.secret_sha256, {WORKLOAD_COLUMNS} FROM workload_credentials c \
             JOIN workloads w ON w.id = c.workload_id WHERE c.id = $1 AND c.revoked_at IS NULL"
        ))
        .bind(credential_id)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|row| {
            Ok((
                sqlx::Row::try_get(&row, "secret_sha256")?,
                WorkloadRecord::from_row(&row)?,
            ))
        })
        .transpose()
    }

    pub async fn list_workloads(&self) -> Result<Vec<WorkloadRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads w ORDER BY w.name"
        ))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(WorkloadRecord::from_row).collect()
    }
}
