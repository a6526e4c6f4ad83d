//! The SQLite schema: `migrations/sqlite/*.sql`, applied in order with `rusqlite_migration`,
//! which records the version in SQLite's `user_version`.
//!
//! Databases made before the store moved to rusqlite recorded their migrations in sqlx's
//! `_sqlx_migrations` table instead; their version is carried over once, so they upgrade in
//! place.

use rusqlite::{Connection, OptionalExtension};
use rusqlite_migration::{M, Migrations};

use crate::store::StoreError;

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(include_str!(
            "../../../migrations/sqlite/0001_broker_core.sql"
        )),
        M::up(include_str!("../../../migrations/sqlite/0002_audit.sql")),
        M::up(include_str!(
            "../../../migrations/sqlite/0003_storage_engine.sql"
        )),
        M::up(include_str!(
            "../../../migrations/sqlite/0004_roles_and_next_keys.sql"
        )),
        M::up(include_str!(
            "../../../migrations/sqlite/0005_workload_identity.sql"
        )),
        M::up(include_str!(
            "../../../migrations/sqlite/0006_registration_entries.sql"
        )),
        M::up(include_str!(
            "../../../migrations/sqlite/0007_jwt_svid_keys.sql"
        )),
        M::up(include_str!(
            "../../../migrations/sqlite/0008_ca_rotation.sql"
        )),
        M::up(include_str!(
            "../../../migrations/sqlite/0009_grant_approvals.sql"
        )),
        M::up(include_str!(
            "../../../migrations/sqlite/0010_lease_uses.sql"
        )),
        M::up(include_str!(
            "../../../migrations/sqlite/0011_leases_by_scope.sql"
        )),
        M::up(include_str!("../../../migrations/sqlite/0012_api_keys.sql")),
    ])
}

/// Brings the schema to the latest version.
pub fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    adopt_sqlx_history(connection)?;
    migrations()
        .to_latest(connection)
        .map_err(|error| StoreError::Migrate(error.to_string()))
}

/// Carries the version of a database migrated by sqlx over to `user_version`.
fn adopt_sqlx_history(connection: &mut Connection) -> Result<(), StoreError> {
    let failed = |error: rusqlite::Error| StoreError::Migrate(error.to_string());
    let user_version: i64 = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(failed)?;
    let has_sqlx_table = connection
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
            [],
            |_| Ok(()),
        )
        .optional()
        .map_err(failed)?
        .is_some();
    if user_version != 0 || !has_sqlx_table {
        return Ok(());
    }
    let applied: i64 = connection
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success",
            [],
            |row| row.get(0),
        )
        .map_err(failed)?;
    let transaction = connection.transaction().map_err(failed)?;
    transaction
        .execute_batch(&format!(
            "PRAGMA user_version = {applied}; DROP TABLE _sqlx_migrations;"
        ))
        .map_err(failed)?;
    transaction.commit().map_err(failed)?;
    tracing::info!(
        version = applied,
        "adopted the schema version sqlx recorded"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_are_valid() {
        super::migrations()
            .validate()
            .expect("migrations apply to an empty database");
    }
}
