//! Applying `migrations/postgres/*.sql` in order, recorded in sqlx's `_sqlx_migrations` table
//! exactly as `sqlx migrate` records them (version, description, SHA-384 checksum), so databases
//! made by earlier versions, which used sqlx's migrator, upgrade in place and the sqlx CLI can
//! still read the history.
//!
//! The migrator is written here rather than taken from sqlx because sqlx's `migrate` feature
//! makes Cargo resolve its optional SQLite driver, whose `libsqlite3-sys` range would then pin
//! the rusqlite version of the SQLite backend.

use ring::digest;
use sqlx::{Connection, PgConnection, Row};

use crate::store::StoreError;

/// One migration file.
struct Migration {
    version: i64,
    description: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "broker core",
        sql: include_str!("../../../migrations/postgres/0001_broker_core.sql"),
    },
    Migration {
        version: 2,
        description: "audit",
        sql: include_str!("../../../migrations/postgres/0002_audit.sql"),
    },
    Migration {
        version: 3,
        description: "storage engine",
        sql: include_str!("../../../migrations/postgres/0003_storage_engine.sql"),
    },
    Migration {
        version: 4,
        description: "roles and next keys",
        sql: include_str!("../../../migrations/postgres/0004_roles_and_next_keys.sql"),
    },
    Migration {
        version: 5,
        description: "workload identity",
        sql: include_str!("../../../migrations/postgres/0005_workload_identity.sql"),
    },
    Migration {
        version: 6,
        description: "registration entries",
        sql: include_str!("../../../migrations/postgres/0006_registration_entries.sql"),
    },
    Migration {
        version: 7,
        description: "JWT-SVID keys",
        sql: include_str!("../../../migrations/postgres/0007_jwt_svid_keys.sql"),
    },
    Migration {
        version: 8,
        description: "CA rotation",
        sql: include_str!("../../../migrations/postgres/0008_ca_rotation.sql"),
    },
    Migration {
        version: 9,
        description: "grant approvals",
        sql: include_str!("../../../migrations/postgres/0009_grant_approvals.sql"),
    },
    Migration {
        version: 10,
        description: "lease uses",
        sql: include_str!("../../../migrations/postgres/0010_lease_uses.sql"),
    },
    Migration {
        version: 11,
        description: "leases by scope",
        sql: include_str!("../../../migrations/postgres/0011_leases_by_scope.sql"),
    },
    Migration {
        version: 12,
        description: "api keys",
        sql: include_str!("../../../migrations/postgres/0012_api_keys.sql"),
    },
];

/// The advisory lock that makes replicas starting together migrate one at a time.
const MIGRATION_LOCK: i64 = 0x5761_7272_616e_7401;

/// Applies every migration not yet recorded, each in its own transaction.
pub async fn run(connection: &mut PgConnection) -> Result<(), StoreError> {
    let failed = |error: sqlx::Error| StoreError::Migrate(error.to_string());
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *connection)
        .await
        .map_err(failed)?;
    let outcome = apply_pending(connection).await;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *connection)
        .await
        .map_err(failed)?;
    outcome
}

async fn apply_pending(connection: &mut PgConnection) -> Result<(), StoreError> {
    let failed = |error: sqlx::Error| StoreError::Migrate(error.to_string());
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
            version BIGINT PRIMARY KEY,
            description TEXT NOT NULL,
            installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
            success BOOLEAN NOT NULL,
            checksum BYTEA NOT NULL,
            execution_time BIGINT NOT NULL
        )",
    )
    .execute(&mut *connection)
    .await
    .map_err(failed)?;
    let applied = sqlx::query("SELECT version, success, checksum FROM _sqlx_migrations")
        .fetch_all(&mut *connection)
        .await
        .map_err(failed)?;
    for row in &applied {
        let (version, success, stored_checksum): (i64, bool, Vec<u8>) = (
            row.try_get(0).map_err(failed)?,
            row.try_get(1).map_err(failed)?,
            row.try_get(2).map_err(failed)?,
        );
        if !success {
            return Err(StoreError::Migrate(format!(
                "migration {version} failed earlier and left the database dirty; repair it by hand"
            )));
        }
        match MIGRATIONS
            .iter()
            .find(|migration| migration.version == version)
        {
            Some(migration) if checksum(migration.sql) != stored_checksum => {
                return Err(StoreError::Migrate(format!(
                    "migration {version} was applied from a different file than this version carries"
                )));
            }
            Some(_) => {}
            None => {
                return Err(StoreError::Migrate(format!(
                    "the database has migration {version}, which this version does not know: it was \
                     migrated by a newer Warrant"
                )));
            }
        }
    }
    for migration in MIGRATIONS {
        let is_applied = applied.iter().any(|row| {
            row.try_get::<i64, _>(0)
                .is_ok_and(|version| version == migration.version)
        });
        if is_applied {
            continue;
        }
        let started = std::time::Instant::now();
        let mut transaction = connection.begin().await.map_err(failed)?;
        sqlx::raw_sql(migration.sql)
            .execute(&mut *transaction)
            .await
            .map_err(|error| {
                StoreError::Migrate(format!("migration {}: {error}", migration.version))
            })?;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, $2, TRUE, $3, $4)",
        )
        .bind(migration.version)
        .bind(migration.description)
        .bind(checksum(migration.sql))
        .bind(i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX))
        .execute(&mut *transaction)
        .await
        .map_err(failed)?;
        transaction.commit().await.map_err(failed)?;
        tracing::info!(version = migration.version, "applied database migration");
    }
    Ok(())
}

/// sqlx's checksum of a migration: SHA-384 of its text.
fn checksum(sql: &str) -> Vec<u8> {
    digest::digest(&digest::SHA384, sql.as_bytes())
        .as_ref()
        .to_vec()
}
